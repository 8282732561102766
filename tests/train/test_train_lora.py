"""`nodegraph train-lora`: kohya-style folders in, a kohya LoRA out that our loader reads back whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nodegraph.cli import main
from nodegraph.folders import Folders
from nodes.lora_info import lora_info
from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.handles import LoraRef
from nodes.sd.lora.coverage import check, coverage
from nodes.sd.lora.loader import decoded, file_stamp, read_lora
from nodes.sd.patcher import patched, restore
from nodes.train.dataset import DatasetError, load_dataset
from nodes.train.network import LoRANetwork
from nodes.train.run import TrainError, TrainRequest, train_lora
from nodes.train.trainer import LATENT_SCALE, LoraTrainer, TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDER = "5_mychar woman"
CAPTIONS = {"img0": "mychar, smiling", "img1": "mychar, red hair"}  # img2, img3 use the folder's caption


def _images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        # smooth colour ramps plus noise: something a VAE encodes to varied latents
        ramp = np.linspace(0, 255, 64, dtype=np.float32)
        base = np.stack(
            [ramp[None, :].repeat(64, 0), ramp[:, None].repeat(64, 1), np.full((64, 64), 40.0 * i)], -1
        )
        pixels = np.clip(base + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


def _base(root: Path, mini_checkpoint: Path) -> Path:
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    (root / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    _images(root / FOLDER, 4)
    for stem, caption in CAPTIONS.items():
        (root / FOLDER / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, models: LoadedCheckpoint, data_dir: Path
) -> Path:
    base = _base(tmp_path_factory.mktemp("base"), mini_checkpoint)
    options = TrainOptions(rank=4, alpha=2, learning_rate=1e-3, resolution=64, seed=1)
    request = TrainRequest("mini.safetensors", data_dir, "mychar", options, steps=4)
    seen: list[tuple[int, int]] = []
    encoded: list[tuple[int, int]] = []
    written = train_lora(
        Folders.at(base),
        request,
        lambda s, n, loss: seen.append((s, n)),
        models=models,
        encoding=lambda i, n: encoded.append((i, n)),
    )
    assert encoded == [(1, 4), (2, 4), (3, 4), (4, 4)]  # every image, before the first step
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert written == [base / "models" / "loras" / "mychar.safetensors"]
    return written[0]


def test_trained_file_loads_whole_as_an_sd15_lora(trained: Path, models: LoadedCheckpoint) -> None:
    stamp = file_stamp(trained)
    lora = read_lora(trained, stamp)
    unet = decoded(trained, stamp, models.unet, "unet")
    report = coverage(lora, trained.name, unet, decoded(trained, stamp, models.text_encoder, "te"))
    # mini UNet: 4 one-block transformers (down 0, mid, up 1 twice); 12 adapted layers each; the
    # text encoder is trained by default, as kohya: 12 layers x 6 projections
    assert report.complete and report.matched == report.total_modules == 48 + 72
    assert report.unet_modules == 48 and report.te_modules == 72
    assert report.family == "sd15" and report.key_family == "sd15"
    assert check(report, "mini.safetensors", "sd15") is None
    with safe_open(str(trained), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_tensor(next(iter(keys))).dtype == torch.float16
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_0_proj_out.alpha" in keys
    assert json.loads(meta["ss_dataset_dirs"]) == {FOLDER: {"n_repeats": 5, "img_count": 4}}
    assert json.loads(meta["ss_tag_frequency"]) == {
        FOLDER: {"mychar": 2, "smiling": 1, "red hair": 1, "mychar woman": 2}
    }
    assert meta["ss_num_train_images"] == "20" and meta["ss_steps"] == "4" and meta["ss_epoch"] == "1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    info = lora_info(trained)
    assert "mychar" in info["trigger_words"]
    assert (info["family"], info["rank"], info["alpha"], info["title"]) == ("sd15", 4, 2.0, "mychar")


def test_up_weights_leave_zero_and_the_lora_changes_the_unet(trained: Path, models: LoadedCheckpoint) -> None:
    fresh = LoRANetwork.create(models.unet, None, rank=4, alpha=2)
    assert all(float(m.lora_up.weight.detach().abs().max()) == 0.0 for m in fresh.loras())
    with safe_open(str(trained), framework="pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]  # noqa: SIM118
    assert ups and all(float(u.abs().max()) > 0.0 for u in ups)

    gen = torch.Generator().manual_seed(3)
    x, cond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 768, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        plain = models.unet(x, t, encoder_hidden_states=cond).sample
        ref = LoraRef(trained, file_stamp(trained), 1.0, trained.name)
        try:
            with patched(models.unet, [ref], target="unet") as unet:
                adapted = unet(x, t, encoder_hidden_states=cond).sample
        finally:
            restore(models.unet)  # the patcher keeps a stack until told otherwise; later tests share it
        after = models.unet(x, t, encoder_hidden_states=cond).sample
    assert float((adapted - plain).abs().max()) > 1e-4
    assert torch.equal(after, plain)


def test_loss_on_a_fixed_batch_falls_when_overfitting_one_image(
    tmp_path: Path, models: LoadedCheckpoint
) -> None:
    _images(tmp_path / "1_mychar", 1, seed=5)
    dataset = load_dataset(tmp_path)
    options = TrainOptions(rank=4, alpha=4, learning_rate=1e-3, resolution=64, train_text_encoder=False)
    trainer = LoraTrainer(models, dataset, options)
    sample = dataset.samples[0]
    gen = torch.Generator().manual_seed(0)
    latents = (trainer.moments(sample)[0] * LATENT_SCALE).expand(4, -1, -1, -1)
    cond = trainer.text([sample.caption] * 4)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.tensor([50, 300, 600, 900])
    x, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([10])
    with torch.no_grad():
        base_out = models.unet(x, t, encoder_hidden_states=cond[:1]).sample
        before = float(trainer.loss(latents, cond, noise, timesteps))
    try:
        trainer.run(30)
        with torch.no_grad():
            after = float(trainer.loss(latents, cond, noise, timesteps))
    finally:
        trainer.close()
    assert trainer.step == 30
    assert after < 0.8 * before, (before, after)
    with torch.no_grad():  # unhooked: the checkpoint's UNet computes exactly as before training
        assert torch.equal(models.unet(x, t, encoder_hidden_states=cond[:1]).sample, base_out)


def test_a_folder_without_a_repeat_prefix_is_named(tmp_path: Path) -> None:
    _images(tmp_path / "5_good", 1)
    _images(tmp_path / "mychar", 1)
    with pytest.raises(DatasetError, match="'mychar'.*no repeat prefix"):
        load_dataset(tmp_path)


def test_a_folder_without_images_is_refused(tmp_path: Path) -> None:
    (tmp_path / "3_empty").mkdir()
    (tmp_path / "3_empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no images"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing")


def test_an_unreadable_image_is_named_before_training(
    tmp_path: Path, mini_checkpoint: Path, models: LoadedCheckpoint
) -> None:
    _images(tmp_path / "data" / "2_x", 1)
    (tmp_path / "data" / "2_x" / "broken.jpg").write_bytes(b"not an image at all")
    base = _base(tmp_path / "base", mini_checkpoint)
    request = TrainRequest(
        "mini.safetensors", tmp_path / "data", "broken", TrainOptions(resolution=64), steps=1
    )
    with pytest.raises(TrainError, match=r"broken\.jpg"):
        train_lora(Folders.at(base), request, models=models)
    assert not list((base / "models" / "loras").iterdir())


def test_cli_trains_writes_the_file_and_refuses_to_overwrite(
    tmp_path: Path, mini_checkpoint: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _base(tmp_path, mini_checkpoint)
    argv = [
        "train-lora",
        "--base-directory",
        str(base),
        "--checkpoint",
        "mini.safetensors",
        "--data",
        str(data_dir),
        "--output",
        "clichar",
        "--steps",
        "2",
        "--rank",
        "2",
        "--resolution",
        "64",
        "--save-precision",
        "bf16",
        "--unet-only",
    ]
    assert main(argv) == 0
    out = base / "models" / "loras" / "clichar.safetensors"
    assert str(out) in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # noqa: SIM118
    stamp = out.stat().st_mtime_ns
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.parent.iterdir()) == ["clichar.safetensors"]  # no partial file


@pytest.mark.parametrize("name", ["../escaped", "sub/../../escaped", "/tmp/escaped"])
def test_cli_refuses_an_output_outside_the_loras_folder(
    tmp_path: Path, mini_checkpoint: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    base = _base(tmp_path, mini_checkpoint)
    argv = [
        "train-lora",
        "--base-directory",
        str(base),
        "--checkpoint",
        "mini.safetensors",
        "--data",
        str(data_dir),
        "--output",
        name,
        "--steps",
        "1",
        "--resolution",
        "64",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--output" in err and "Traceback" not in err
    assert not (base / "models" / "escaped.safetensors").exists()


def test_cli_names_a_missing_checkpoint(
    tmp_path: Path, mini_checkpoint: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = _base(tmp_path, mini_checkpoint)
    argv = [
        "train-lora",
        "--base-directory",
        str(base),
        "--checkpoint",
        "nope.safetensors",
        "--data",
        str(data_dir),
        "--output",
        "x",
        "--steps",
        "1",
        "--resolution",
        "64",
    ]
    assert main(argv) == 1
    assert "nope.safetensors" in capsys.readouterr().err


def test_text_encoder_adapters_are_saved_with_kohya_names_and_load_whole(
    tmp_path: Path, mini_checkpoint: Path, models: LoadedCheckpoint, data_dir: Path
) -> None:
    base = _base(tmp_path, mini_checkpoint)
    options = TrainOptions(rank=2, alpha=1, resolution=64, train_text_encoder=True, text_encoder_lr=5e-5)
    request = TrainRequest("mini.safetensors", data_dir, "withte", options, steps=2, save_precision="fp32")
    (path,) = train_lora(Folders.at(base), request, models=models)
    stamp = file_stamp(path)
    te = decoded(path, stamp, models.text_encoder, "te")
    report = coverage(read_lora(path, stamp), path.name, decoded(path, stamp, models.unet, "unet"), te)
    assert report.complete and report.unet_modules == 48 and report.te_modules == 12 * 6
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert "lora_te_text_model_encoder_layers_11_mlp_fc2.lora_up.weight" in set(f.keys())  # noqa: SIM118
        te_ups = [f.get_tensor(k) for k in f.keys() if k.startswith("lora_te_") and "lora_up" in k]  # noqa: SIM118
    assert all(float(u.abs().max()) > 0 for u in te_ups)  # the text encoder's adapters were trained
    assert "ss_network_train_unet_only" not in meta and meta["ss_text_encoder_lr"] == "5e-05"


def test_save_every_n_epochs_writes_kohya_numbered_files(
    tmp_path: Path, mini_checkpoint: Path, models: LoadedCheckpoint, data_dir: Path
) -> None:
    base = _base(tmp_path, mini_checkpoint)
    options = TrainOptions(
        rank=2, alpha=2, resolution=64, batch_size=10, train_text_encoder=False
    )  # 2 steps/epoch
    request = TrainRequest("mini.safetensors", data_dir, "ep", options, epochs=3, save_every_n_epochs=1)
    written = train_lora(Folders.at(base), request, models=models)
    assert [p.name for p in written] == ["ep-000001.safetensors", "ep-000002.safetensors", "ep.safetensors"]
    epochs = []
    for path in written:
        with safe_open(str(path), framework="pt") as f:
            epochs.append((f.metadata()["ss_epoch"], f.metadata()["ss_steps"]))
    assert epochs == [("1", "2"), ("2", "4"), ("3", "6")]
    with pytest.raises(TrainError, match="ep-000001.safetensors' already exists"):
        train_lora(Folders.at(base), request, models=models)


def test_an_interrupt_leaves_no_file(
    tmp_path: Path, mini_checkpoint: Path, models: LoadedCheckpoint, data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    base = _base(tmp_path, mini_checkpoint)
    loras = base / "models" / "loras"
    request = TrainRequest(
        "mini.safetensors",
        data_dir,
        "cut",
        TrainOptions(rank=2, resolution=64, train_text_encoder=False),
        steps=3,
    )

    def interrupt(step: int, total: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(Folders.at(base), request, interrupt, models=models)
    assert not list(loras.iterdir())

    import safetensors.torch

    def half_written(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        train_lora(Folders.at(base), request, models=models)
    assert not list(loras.iterdir())


def test_a_seed_gives_the_same_lora_and_another_seed_another(
    tmp_path: Path, mini_checkpoint: Path, models: LoadedCheckpoint, data_dir: Path
) -> None:
    base = _base(tmp_path, mini_checkpoint)
    tensors = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        options = TrainOptions(rank=2, resolution=64, learning_rate=1e-3, seed=seed, train_text_encoder=False)
        request = TrainRequest("mini.safetensors", data_dir, name, options, steps=2)
        (path,) = train_lora(Folders.at(base), request, models=models)
        with safe_open(str(path), framework="pt") as f:
            tensors.append({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    a, b, c = tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_device_flags_reach_the_trainer(
    tmp_path: Path,
    mini_checkpoint: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nodes.train.run as run

    base = _base(tmp_path, mini_checkpoint)
    argv = [
        "train-lora",
        "--base-directory",
        str(base),
        "--checkpoint",
        "mini.safetensors",
        "--data",
        str(data_dir),
        "--output",
        "dev",
        "--steps",
        "1",
        "--resolution",
        "64",
        "--unet-only",
    ]
    seen: list[torch.device] = []
    real = run.LoraTrainer

    def trainer(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "LoraTrainer", trainer)
    assert main([*argv, "--cpu"]) == 0
    assert seen == [torch.device("cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*argv, "--overwrite", "--device", "cuda"]) == 1
    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--precision", "fp16"]) == 1
    assert "keeps the model in fp32" in capsys.readouterr().err
    assert len(seen) == 1  # neither refused run reached the trainer


def test_regularisation_images_and_min_snr_weight_the_loss_as_kohya(
    tmp_path: Path, models: LoadedCheckpoint
) -> None:
    """kohya's loss weights: `--prior_loss_weight` on each regularisation image of a batch
    (`train_network.py`: `loss * batch["loss_weights"]`) and, with `--min_snr_gamma`,
    min(SNR, γ) / SNR at each sample's timestep (`custom_train_functions.apply_snr_weight`)."""
    _images(tmp_path / "img" / "1_mychar", 1, seed=3)
    _images(tmp_path / "reg" / "1_woman", 1, seed=4)
    dataset = load_dataset(tmp_path / "img", reg_root=tmp_path / "reg")
    options = TrainOptions(rank=2, resolution=64, train_text_encoder=False, prior_loss_weight=0.25)
    trainer = LoraTrainer(models, dataset, options)
    try:
        train, reg = sorted(dataset.samples, key=lambda s: s.is_reg)
        weights: list[list[float]] = []
        real = trainer.loss

        def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
            weights.append(args[4].tolist())
            return real(*args, **kwargs)

        trainer.loss = spy  # type: ignore[method-assign]
        trainer.micro_step([reg, train], 1.0)
        assert weights == [[0.25, 1.0]]
        gen = torch.Generator().manual_seed(0)
        latents = trainer.moments(train)[0][None] * LATENT_SCALE
        cond, noise = trainer.text([train.caption]), torch.randn(latents.shape, generator=gen)
        ratios = []
        with torch.no_grad():
            for t in (20, 900):
                timestep = torch.tensor([t])
                plain = real(latents, cond, noise, timestep)
                trainer.options.min_snr_gamma = 5.0
                weighted = real(latents, cond, noise, timestep)
                trainer.options.min_snr_gamma = None
                ratios.append(float(weighted / plain))
        ac = trainer.alphas_cumprod[[20, 900]]
        snr = ac / (1 - ac)
        expected = (torch.minimum(snr, torch.full_like(snr, 5.0)) / snr).tolist()
        assert float(snr[0]) > 5 > float(snr[1]) and ratios == pytest.approx(expected, rel=1e-5)
    finally:
        trainer.close()


def test_network_weights_continue_from_a_lora_file_and_another_rank_is_refused(
    tmp_path: Path, mini_checkpoint: Path, trained: Path, models: LoadedCheckpoint, data_dir: Path
) -> None:
    """kohya's `--network_weights`: the adapters start as the file's (every module of it loaded);
    a file of another rank is refused naming the tensor, before any step."""
    from safetensors.torch import load_file

    tensors = load_file(str(trained))
    network = LoRANetwork.create(models.unet, models.text_encoder, 4, 2)
    assert network.load_weights(tensors) == len(tensors) // 3 == 120
    state = network.lora_state_dict()
    assert all(torch.equal(state[k], tensors[k].float()) for k in tensors)
    base = _base(tmp_path, mini_checkpoint)
    options = TrainOptions(rank=2, alpha=2, resolution=64)
    request = TrainRequest("mini.safetensors", data_dir, "more", options, steps=1, network_weights=trained)
    with pytest.raises(
        TrainError, match=r"--network_weights .*mychar\.safetensors' cannot be used: .*another rank"
    ):
        train_lora(Folders.at(base), request, models=models)
    assert not list((base / "models" / "loras").iterdir())


def test_gradient_accumulation_divides_each_loss_by_the_steps_as_accelerate(
    tmp_path: Path, models: LoadedCheckpoint
) -> None:
    """kohya accumulates through accelerate, whose `backward` divides every loss by
    `gradient_accumulation_steps`: an epoch's last, shorter group has a proportionally smaller
    gradient (clipping and Adam's epsilon see it), not a renormalised one."""
    _images(tmp_path / "1_mychar", 1, seed=6)
    dataset = load_dataset(tmp_path)
    options = TrainOptions(rank=2, resolution=64, train_text_encoder=False, max_grad_norm=0.0)
    trainer = LoraTrainer(models, dataset, options)
    grads: list[list[torch.Tensor]] = []

    def capture() -> None:  # the optimizer step, replaced: keep the gradients, change nothing
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        grads.append([p.grad.clone() for p in params if p.grad is not None])
        trainer.optimizer.zero_grad(set_to_none=True)

    trainer.optimizer_step = capture  # type: ignore[method-assign]
    try:
        batch = [dataset.samples[0]]
        state = trainer.generator.get_state(), trainer.caption_rng.getstate()
        for accum in (1, 3):
            trainer.options.gradient_accumulation_steps = accum
            trainer.generator.set_state(state[0])
            trainer.caption_rng.setstate(state[1])
            trainer.train_step([batch])  # a lone batch: the end of an epoch
    finally:
        trainer.close()
    one, third = grads
    assert len(one) == len(third) > 0 and any(float(g.abs().max()) > 0 for g in one)
    assert [float(t.norm()) > 0 for t in third] == [float(o.norm()) > 0 for o in one]
    ratios = [float(o.norm() / t.norm()) for t, o in zip(third, one, strict=True) if float(t.norm()) > 0]
    assert ratios and ratios == pytest.approx([3.0] * len(ratios), rel=1e-5)


def test_clip_skip_trains_on_the_layer_kohya_takes(tmp_path: Path, models: LoadedCheckpoint) -> None:
    """`--clip_skip 2` (SD1.x): kohya's `hidden_states[-2]` through the final layer norm."""
    from nodes.train.captions import chunked_ids

    _images(tmp_path / "1_mychar", 1, seed=8)
    options = TrainOptions(rank=1, resolution=64, train_text_encoder=False, clip_skip=2)
    trainer = LoraTrainer(models, load_dataset(tmp_path), options)
    try:
        skipped = trainer.text(["mychar, smiling"])
        ids = torch.tensor(chunked_ids("mychar, smiling", trainer.tokenizer, None))
        with torch.no_grad():
            out = models.text_encoder(input_ids=ids, output_hidden_states=True)
            expected = models.text_encoder.final_layer_norm(out.hidden_states[-2])
    finally:
        trainer.close()
    assert torch.equal(skipped, expected) and not torch.allclose(skipped, out.last_hidden_state)


def test_offset_noise_and_gradient_clipping_are_kohyas(tmp_path: Path, models: LoadedCheckpoint) -> None:
    """`--noise_offset 0.1`: ε + 0.1 · N(0, 1) per sample and channel (`apply_noise_offset`);
    `--max_grad_norm`: the adapters' gradient norm is clipped to it before the optimizer steps."""
    _images(tmp_path / "1_mychar", 1, seed=9)
    dataset = load_dataset(tmp_path)
    options = TrainOptions(
        rank=2, resolution=64, train_text_encoder=False, noise_offset=0.1, max_grad_norm=1e-4
    )
    trainer = LoraTrainer(models, dataset, options)
    noises: list[torch.Tensor] = []
    norms: list[float] = []
    real_loss, real_step = trainer.loss, trainer.optimizer.step

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        noises.append(args[2])
        return real_loss(*args, **kwargs)

    def step(*args: Any, **kwargs: Any) -> Any:
        params = [p for g in trainer.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return real_step(*args, **kwargs)

    trainer.loss = spy  # type: ignore[method-assign]
    trainer.optimizer.step = step  # type: ignore[method-assign]
    try:
        state = trainer.generator.get_state()
        trainer.train_step([[dataset.samples[0]]])
        gen = torch.Generator().manual_seed(0)
        gen.set_state(state)
        shape = (1, 4, 8, 8)
        torch.randn(shape, generator=gen)  # the posterior sample of the latents comes first
        expected = torch.randn(shape, generator=gen) + 0.1 * torch.randn((1, 4, 1, 1), generator=gen)
    finally:
        trainer.close()
    assert torch.equal(noises[0], expected)
    assert norms == [pytest.approx(1e-4, rel=1e-3)]  # clipped from a far larger norm


def test_mixed_precision_fp16_and_bf16_train_close_to_fp32(tmp_path: Path, models: LoadedCheckpoint) -> None:
    """`--mixed_precision fp16` (the kohya_ss GUI's default, with a gradient scaler) and bf16 run on
    this device too; three steps land near the fp32 run's adapters."""
    _images(tmp_path / "1_mychar", 1, seed=10)
    dataset = load_dataset(tmp_path)
    ups: dict[str, torch.Tensor] = {}
    for precision in ("no", "fp16", "bf16"):
        options = TrainOptions(rank=2, resolution=64, mixed_precision=precision, learning_rate=1e-2, seed=4)
        trainer = LoraTrainer(models, dataset, options)
        try:
            assert trainer.scaler.is_enabled() == (precision == "fp16")
            losses = [trainer.train_step([[dataset.samples[0]]]) for _ in range(3)]
            ups[precision] = torch.cat([m.lora_up.weight.detach().flatten() for m in trainer.network.loras()])
        finally:
            trainer.close()
        assert all(np.isfinite(losses)), (precision, losses)
    norm = float(ups["no"].norm())
    assert norm > 1e-2  # the adapters moved
    for precision in ("fp16", "bf16"):  # Adam's near-sign steps: a few elements of tiny gradient differ
        assert float((ups[precision] - ups["no"]).norm()) < 0.25 * norm, precision  # measured 0.15 (bf16)


def test_a_zero_learning_rate_leaves_that_part_untrained_as_kohya(
    tmp_path: Path, mini_checkpoint: Path, models: LoadedCheckpoint, data_dir: Path
) -> None:
    """kohya's `assemble_params` skips a group whose rate is 0 ("NO LR skipping!"): the kohya_ss
    habit `--text_encoder_lr 0` trains the UNet alone; with nothing left to train the run is refused."""
    _images(tmp_path / "1_mychar", 1, seed=3)
    dataset = load_dataset(tmp_path)
    options = TrainOptions(
        rank=2, resolution=64, learning_rate=1e-3, train_text_encoder=True, text_encoder_lr=0.0
    )
    trainer = LoraTrainer(models, dataset, options)
    try:
        trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert trained == {id(p) for p in trainer.network.unet_loras.parameters()}
        trainer.train_step([[dataset.samples[0]]])
        ups = {lora.lora_name: lora.lora_up.weight.detach().clone() for lora in trainer.network.loras()}
    finally:
        trainer.close()
    assert all(float(u.abs().max()) == 0 for k, u in ups.items() if k.startswith("lora_te"))
    assert any(float(u.abs().max()) > 0 for k, u in ups.items() if k.startswith("lora_unet"))

    base = _base(tmp_path / "root", mini_checkpoint)
    for te, message in ((False, "--network_train_unet_only"), (True, "--text_encoder_lr 0")):
        zero = TrainOptions(rank=2, resolution=64, unet_lr=0.0, train_text_encoder=te, text_encoder_lr=0.0)
        with pytest.raises(TrainError, match="nothing would be trained") as info:
            train_lora(Folders.at(base), TrainRequest("mini.safetensors", data_dir, "zero", zero, steps=1))
        assert message in str(info.value)
    negative = TrainOptions(rank=2, resolution=64, unet_lr=-1e-4)
    with pytest.raises(TrainError, match="--unet_lr must be 0 or more"):
        train_lora(Folders.at(base), TrainRequest("mini.safetensors", data_dir, "neg", negative, steps=1))
    assert not list((base / "models" / "loras").iterdir())


def test_flip_augmentation_mirrors_half_the_draws_left_to_right(
    tmp_path: Path, models: LoadedCheckpoint
) -> None:
    """`--flip_aug`: each sample is mirrored with probability 0.5 (kohya's HorizontalFlip p=0.5,
    or its cached `latents_flipped`); the flipped latents are those of the mirrored image."""
    _images(tmp_path / "1_mychar", 1, seed=4)
    image = tmp_path / "1_mychar" / "img0.png"
    with Image.open(image) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "1_mychar" / "mirror.png")
    dataset = load_dataset(tmp_path)
    by_name = {s.image.name: s for s in dataset.samples}
    for flip_aug in (True, False):
        options = TrainOptions(rank=2, resolution=64, train_text_encoder=False, flip_aug=flip_aug, seed=5)
        trainer = LoraTrainer(models, dataset, options)
        drawn: list[bool] = []
        real = trainer.latents

        def spy(
            samples: list[Any], flips: list[bool], real: Any = real, drawn: list[bool] = drawn
        ) -> torch.Tensor:
            drawn.extend(flips)
            return real(samples, flips)

        trainer.latents = spy  # type: ignore[method-assign]
        try:
            for _ in range(12):
                trainer.micro_step([by_name["img0.png"]], 1.0)
            if flip_aug:
                mirrored = trainer.latent_cache.moments(by_name["img0.png"], True)
                plain = trainer.latent_cache.moments(by_name["mirror.png"], False)
                unflipped = trainer.latent_cache.moments(by_name["img0.png"], False)
        finally:
            trainer.close()
        if flip_aug:
            assert 2 <= sum(drawn) <= 10  # both kinds of draw (p = 0.5 each, seeded)
            assert all(torch.allclose(m, p, atol=1e-5) for m, p in zip(mirrored, plain, strict=True))
            assert not torch.allclose(mirrored[0], unflipped[0], atol=1e-3)
        else:
            assert drawn == [False] * 12
