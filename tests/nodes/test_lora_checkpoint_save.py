"""CheckpointSave: the LoRA stack baked into an original-layout file that our own loader reads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.lora import LoraLoader
from nodes.model_save import CheckpointSave
from nodes.sd.checkpoint import load_checkpoint
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sd.patcher import patched, restore


def _unet_out(unet: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 768, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx).sample


def test_saved_checkpoint_loads_and_matches_the_patched_model(
    tmp_path: Path, mini_checkpoint: Path, mini_loras: Path
) -> None:
    ckpt = load_checkpoint(mini_checkpoint)
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "a.safetensors").write_bytes(
        (mini_loras / "mini_lora_a.safetensors").read_bytes()
    )
    ctx = RecordingContext(Environment(Folders.at(tmp_path)))
    model = ModelHandle(ckpt.unet, "mini_sd15.safetensors", ckpt.family)
    clip = ClipHandle(ckpt.text_encoder, None, "mini_sd15.safetensors", ckpt.family)
    vae = VaeHandle(ckpt.vae, "mini_sd15.safetensors")
    model, clip = LoraLoader().run(ctx, model, clip, "a.safetensors", 0.9, -0.6)
    node = CheckpointSave()
    node.run(ctx, model, clip, vae, "checkpoints/ComfyUI", prompt={"1": {"class_type": "X"}})
    node.run(ctx, model, clip, vae, "checkpoints/ComfyUI")
    first = tmp_path / "output" / "checkpoints" / "ComfyUI_00001_.safetensors"
    assert first.is_file() and (first.parent / "ComfyUI_00002_.safetensors").is_file()
    with safe_open(str(first), "pt") as f:
        assert '"class_type": "X"' in f.metadata()["prompt"]
        assert all(f.get_slice(k).get_dtype() == "F16" for k in list(f.keys())[:20])
    saved = load_checkpoint(first)
    with patched(model.unet, model.loras, target="unet"), patched(clip.text_encoder, clip.loras, target="te"):
        want = _unet_out(model.unet)
        te_params = {n: p.detach().clone() for n, p in clip.text_encoder.named_parameters()}
    restore(model.unet)
    restore(clip.text_encoder)
    got = _unet_out(saved.unet)
    base = _unet_out(ckpt.unet)
    assert (got - want).abs().max() < 1e-2 * (want - base).abs().max()  # only the fp16 storage differs
    assert all(torch.equal(p, te_params[n]) for n, p in saved.text_encoder.named_parameters())
    assert all(torch.equal(p, dict(ckpt.vae.named_parameters())[n]) for n, p in saved.vae.named_parameters())


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
