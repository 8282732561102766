"""A LoCon LoRA (3x3 convolutions adapted, kohya's conv_dim) as the trainer saves it loads whole,
and nodegraph's patcher computes what the trainer's hooks computed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.handles import LoraRef
from nodes.sd.lora.coverage import coverage
from nodes.sd.lora.loader import decoded, file_stamp, read_lora
from nodes.sd.patcher import patched, restore
from nodes.train.dataset import load_dataset
from nodes.train.network import LoRANetwork
from nodes.train.save import save_lora
from nodes.train.trainer import LoraTrainer, TrainOptions


def test_gradient_checkpointing_takes_the_same_step(tmp_path: Path, models: LoadedCheckpoint) -> None:
    folder = tmp_path / "1_x"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        folder / "a.png"
    )
    dataset, steps = load_dataset(tmp_path), []
    for checkpointing in (False, True):
        options = TrainOptions(
            rank=2, resolution=64, learning_rate=1e-3, gradient_checkpointing=checkpointing
        )
        trainer = LoraTrainer(models, dataset, options, torch.device("cpu"), 2)
        trainer.prepare()
        loss = trainer.train_step(trainer.epoch_batches())
        trainer.close()
        steps.append((loss, trainer.network.lora_state_dict()))
    assert not models.unet.is_gradient_checkpointing  # switched off again when the trainer closes
    (loss_a, a), (loss_b, b) = steps
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)


def test_a_locon_file_loads_whole_and_applies_as_trained(tmp_path: Path, models: LoadedCheckpoint) -> None:
    torch.manual_seed(0)
    net = LoRANetwork.create(models.unet, models.text_encoder, 2, 1, conv_rank=2, conv_alpha=1)
    for lora in net.loras():  # as if trained: up weights leave zero
        torch.nn.init.normal_(lora.lora_up.weight, std=0.01)
    path = tmp_path / "locon.safetensors"
    save_lora(net.lora_state_dict(), {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"},
              path, "fp32")  # fmt: skip
    stamp = file_stamp(path)
    unet, te = decoded(path, stamp, models.unet, "unet"), decoded(path, stamp, models.text_encoder, "te")
    report = coverage(read_lora(path, stamp), path.name, unet, te)
    # 48 transformer layers + 31 in ResNet blocks and down/up-samplers; 72 in the text encoder
    assert report.complete and (report.unet_modules, report.te_modules) == (79, 72)
    x, cond, t = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768), torch.tensor([500])
    with torch.no_grad():
        net.apply_to()
        net.eval()
        hooked = models.unet(x, t, encoder_hidden_states=cond).sample
        net.remove()
        try:
            with patched(models.unet, [LoraRef(path, stamp, 1.0, path.name)], target="unet") as patched_unet:
                applied = patched_unet(x, t, encoder_hidden_states=cond).sample
        finally:
            restore(models.unet)
        plain = models.unet(x, t, encoder_hidden_states=cond).sample
    assert float((hooked - plain).abs().max()) > 1e-2
    assert float((hooked - applied).abs().max()) < 1e-4
