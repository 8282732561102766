"""SDXL LoRA training as kohya's `sdxl_train_network.py` does it, on the mini SDXL checkpoint: kohya's
module names for both text encoders and the SGM-layout UNet, its size conditioning per bucket, its
metadata, and a file our loader applies whole."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nodegraph.cli import main
from nodegraph.folders import Folders
from nodes.sd.checkpoint import LoadedCheckpoint, SafetensorsSource
from nodes.sd.handles import ClipHandle, LoraRef
from nodes.sd.lora.coverage import check, coverage
from nodes.sd.lora.loader import decoded, file_stamp, read_lora
from nodes.sd.patcher import patched, restore
from nodes.sd.text_encoder_sdxl import encode_sdxl, tokenize_sdxl
from nodes.sd.tokenizer import default_tokenizer
from nodes.train.dataset import load_dataset
from nodes.train.run import TrainError, TrainHooks, TrainRequest, train_lora
from nodes.train.sdxl import size_condition
from nodes.train.trainer import LoraTrainer, TrainOptions
from tests.train.test_train_guide import KOHYA_KEYS

FOLDER = "1_zzkx cube"
# (W, H) of the stand-in images: two wide ones share the 160x96 bucket, the square one goes to 128x128
SIZES = {"wide": (101, 64), "wider": (100, 62), "square": (64, 64)}
# kohya's (original H, W, crop top, left, target H, W) for them, worked by hand from
# train_util.BucketManager.get_crop_ltrb: 101x64 in 160x96 is fitted inside as 151.5x96, so the
# left offset is (160 - 151.5) // 2 = 4; 100x62 -> 154.84x96, left (160 - 154.84) // 2 = 2.
KOHYA_SIZES = {
    "wide": [64, 101, 0, 4, 96, 160],
    "wider": [62, 100, 0, 2, 96, 160],
    "square": [64, 64, 0, 0, 128, 128],
}


def _options(**given: Any) -> TrainOptions:
    """Buckets of 128x128's area between 64 and 256 px in steps of 32 (SDXL needs steps of 32)."""
    return TrainOptions(
        resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32, **given
    )


def _dataset(root: Path) -> Path:
    folder = root / FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for name, (w, h) in SIZES.items():
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
        pixels = np.clip(ramp + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"zzkx cube, {name}\n", encoding="utf-8")
    return root


def _base(root: Path, checkpoint: Path) -> Path:
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "loras").mkdir(parents=True)
    (root / "models" / "checkpoints" / "mini_sdxl.safetensors").symlink_to(checkpoint)
    return root


@pytest.fixture(scope="module")
def models(sdxl_store: Any, mini_sdxl_checkpoint: Path) -> LoadedCheckpoint:
    """The session's loaded mini SDXL (training hooks adapters in and takes them out again)."""
    loaded: LoadedCheckpoint = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    return loaded


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, mini_sdxl_checkpoint: Path, models: LoadedCheckpoint
) -> dict[str, Any]:
    """Two steps (one epoch: a batch of the two wide images, then the square one), text encoders
    trained (kohya's default), a sample after step 2; what the UNet received is recorded."""
    base = _base(tmp_path_factory.mktemp("base"), mini_sdxl_checkpoint)
    data = _dataset(tmp_path_factory.mktemp("data"))
    prompts = base / "prompts.txt"
    prompts.write_text("zzkx cube --n blurry --w 64 --h 64 --s 2 --d 5 --l 5\n", encoding="utf-8")
    options = _options(rank=4, alpha=4, learning_rate=1e-3, batch_size=2, seed=3)
    request = TrainRequest(
        "mini_sdxl.safetensors", data, "xl", options, steps=2, sample_prompts=prompts, sample_every_n_steps=2
    )
    seen: list[dict[str, Any]] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled():  # training; the sampler runs under inference mode
            added = kwargs["added_cond_kwargs"]
            cond = kwargs["encoder_hidden_states"]
            seen.append(
                {
                    "time_ids": added["time_ids"].tolist(),
                    "pooled": tuple(added["text_embeds"].shape),
                    "cond": tuple(cond.shape),
                    "latent": tuple(args[0].shape),
                }
            )

    losses: list[float] = []
    handle = models.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        written = train_lora(Folders.at(base), request, lambda s, n, loss: losses.append(loss), models=models)
    finally:
        handle.remove()
    return {"written": written, "seen": seen, "losses": losses, "base": base}


def _kohya_modules(checkpoint: Path) -> set[str]:
    """kohya's `LoRANetwork.create_modules` for SDXL, worked from the checkpoint's own tensor names.

    UNet (kohya trains its SGM-layout UNet): every Linear (2-D weight) and 1x1 Conv2d inside a
    `Transformer2DModel` (`input_blocks.N.1`, `middle_block.1`, `output_blocks.N.1`).
    CLIP-L and bigG: q/k/v/out projections and both MLP layers of every layer (bigG's fused
    open_clip `in_proj` becomes q, k and v in kohya's transformers model).
    """
    source = SafetensorsSource(checkpoint)
    names: set[str] = set()
    unet = re.compile(
        r"model\.diffusion_model\.((?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\..+)\.weight$"
    )
    for key in source.keys():
        found = unet.match(key)
        shape = source.shape(key)
        if found and (len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))):
            names.add("lora_unet_" + found.group(1).replace(".", "_"))
    projections = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
    projections += ("mlp_fc1", "mlp_fc2")
    layers_l = {
        int(m.group(1)) for k in source.keys() if (m := re.search(r"embedders\.0\..*layers\.(\d+)\.", k))
    }
    layers_g = {int(m.group(1)) for k in source.keys() if (m := re.search(r"resblocks\.(\d+)\.", k))}
    for prefix, layers in (("lora_te1", layers_l), ("lora_te2", layers_g)):
        names |= {f"{prefix}_text_model_encoder_layers_{i}_{p}" for i in layers for p in projections}
    return names


def test_the_file_holds_exactly_kohyas_sdxl_modules_and_loads_whole(
    run: dict[str, Any], models: LoadedCheckpoint, mini_sdxl_checkpoint: Path
) -> None:
    path = run["written"][-1]
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    expected = _kohya_modules(mini_sdxl_checkpoint)
    # mini UNet: 5 one-block and 6 two-block transformers -> 5*12 + 6*22 = 192; CLIP-L 12x6, bigG 32x6
    assert len(expected) == 192 + 72 + 192
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    assert keys == {f"{m}.{s}" for m in expected for s in suffixes}
    assert alphas == {4.0}
    stamp = file_stamp(path)
    report = coverage(
        read_lora(path, stamp),
        path.name,
        decoded(path, stamp, models.unet, "unet"),
        decoded(path, stamp, models.text_encoder, "te"),
        decoded(path, stamp, models.text_encoder_2, "te2"),
    )
    assert report.complete and not report.unmatched and not report.failed
    assert (report.unet_modules, report.te_modules, report.te2_modules) == (192, 72, 192)
    assert report.family == "sdxl" and report.key_family == "sdxl"
    assert check(report, "mini_sdxl.safetensors", "sdxl") is None


def test_metadata_has_kohyas_keys_with_its_sdxl_values(run: dict[str, Any]) -> None:
    with safe_open(str(run["written"][-1]), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == KOHYA_KEYS
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "128x128" and meta["ss_resolution"] == "(128, 128)"
    assert meta["ss_steps"] == "2" and meta["ss_num_batches_per_epoch"] == "2"
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert buckets == {
        "0": {"resolution": [128, 128], "count": 1},
        "1": {"resolution": [160, 96], "count": 2},
    }


def test_the_unet_gets_kohyas_size_conditioning_per_bucket(run: dict[str, Any]) -> None:
    seen = run["seen"]
    assert run["losses"] and len(run["losses"]) == 2
    rows = sorted(r for call in seen for r in call["time_ids"])
    assert rows == sorted(KOHYA_SIZES.values())  # each image once, as kohya records it
    for call in seen:
        batch = len(call["time_ids"])
        assert call["pooled"] == (batch, 1280) and call["cond"] == (batch, 77, 2048)
        h, w = int(call["time_ids"][0][4]), int(call["time_ids"][0][5])
        assert call["latent"] == (batch, 4, h // 8, w // 8)  # the target is the bucket


def test_size_condition_worked_cases() -> None:
    """kohya's arithmetic for a flipped, a portrait and an unbucketed image."""
    # flipped: left = W - crop_right = 160 - (4 + 151.5) = 4.5 -> 4
    assert size_condition((101, 64), (160, 96), flipped=True) == [64, 101, 0, 4, 96, 160]
    # 64x101 in 96x160: fitted as 96x151.5, top (160 - 151.5) // 2 = 4
    assert size_condition((64, 101), (96, 160)) == [101, 64, 4, 0, 160, 96]
    # buckets off: kohya records the training size and crop (0, 0, 0, 0); flipped, left = W
    assert size_condition((300, 200), (128, 128), bucketed=False) == [128, 128, 0, 0, 128, 128]
    assert size_condition((300, 200), (128, 128), True, bucketed=False) == [128, 128, 0, 128, 128, 128]


def test_training_text_equals_the_sdxl_prompt_path(models: LoadedCheckpoint, tmp_path: Path) -> None:
    """kohya's SDXL text (penultimate layers unnormalised, bigG's pooled output at the first end
    token) is what our CLIPTextEncode computes for the same plain prompt (ComfyUI's SDXL path)."""
    dataset = load_dataset(_dataset(tmp_path))
    trainer = LoraTrainer(models, dataset, _options(rank=1, train_text_encoder=False))
    try:
        hidden, pooled = trainer.encode(["zzkx cube, a photo"])
    finally:
        trainer.close()
    clip = ClipHandle(
        models.text_encoder, trainer.tokenizer, "mini", "sdxl", text_encoder_2=models.text_encoder_2
    )
    ref_hidden, ref_pooled = encode_sdxl(clip, tokenize_sdxl(clip, "zzkx cube, a photo"))
    assert pooled is not None and hidden.shape == ref_hidden.shape == (1, 77, 2048)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-4)


def test_the_lora_changes_the_unet_and_both_text_encoders(
    run: dict[str, Any], models: LoadedCheckpoint
) -> None:
    path = run["written"][-1]
    ref = LoraRef(path, file_stamp(path), 1.0, path.name)
    gen = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 2048, generator=gen)
    added = {
        "text_embeds": torch.randn(1, 1280, generator=gen),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    t = torch.tensor([400])
    with torch.no_grad():
        plain = models.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        try:
            with patched(models.unet, [ref], target="unet") as unet:
                adapted = unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        finally:
            restore(models.unet)
        after = models.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
    assert float((adapted - plain).abs().max()) > 1e-4 and torch.equal(after, plain)
    clip = ClipHandle(
        models.text_encoder, default_tokenizer(), "mini", "sdxl", text_encoder_2=models.text_encoder_2
    )
    tokens = tokenize_sdxl(clip, "zzkx cube")
    base_hidden, base_pooled = encode_sdxl(clip, tokens)
    try:
        lora_hidden, lora_pooled = encode_sdxl(clip.with_lora(ref), tokens)
    finally:
        restore(models.text_encoder)
        restore(models.text_encoder_2)
    assert float((lora_hidden[..., :768] - base_hidden[..., :768]).abs().max()) > 1e-4  # CLIP-L
    assert float((lora_hidden[..., 768:] - base_hidden[..., 768:]).abs().max()) > 1e-4  # bigG
    assert float((lora_pooled - base_pooled).abs().max()) > 1e-4


def test_a_sample_is_drawn_on_the_sdxl_path(run: dict[str, Any]) -> None:
    samples = sorted((run["base"] / "output" / "xl" / "samples").glob("xl_000002_00_*_5.png"))
    assert len(samples) == 1
    pixels = np.asarray(Image.open(samples[0]))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1.0


def test_loss_on_a_fixed_batch_falls(models: LoadedCheckpoint, tmp_path: Path) -> None:
    """Gradients reach the adapters through the SDXL UNet's text and size inputs: eight optimizer
    steps on one fixed noised batch lower its loss (measured: 1.133 -> 0.832 over eight steps)."""
    dataset = load_dataset(_dataset(tmp_path))
    options = TrainOptions(
        rank=4,
        alpha=4,
        learning_rate=2e-3,
        train_text_encoder=False,
        seed=2,
        resolution=64,
        min_bucket_reso=64,
    )
    trainer = LoraTrainer(models, dataset, options)
    try:
        sample = next(s for s in dataset.samples if s.image.stem == "wide")
        assert trainer.placement[sample][0] == (64, 64)  # the only bucket of a 64x64 area
        latents = (trainer.moments(sample)[0] * trainer.latent_scale).expand(2, -1, -1, -1)
        cond, pooled = trainer.encode([sample.caption] * 2)
        assert pooled is not None
        added = (pooled, trainer.size_values([sample] * 2, [False, True]))
        gen = torch.Generator().manual_seed(0)
        noise, timesteps = torch.randn(latents.shape, generator=gen), torch.tensor([200, 700])
        losses = []
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(8):
                loss = trainer.loss(latents, cond, noise, timesteps, added=added)
                loss.backward()
                trainer.optimizer_step()
                losses.append(float(loss.detach()))
    finally:
        trainer.close()
    assert losses[-1] < 0.8 * losses[0], losses


def test_kohyas_sdxl_command_line_is_checked_before_the_model_loads(
    tmp_path: Path, mini_sdxl_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The family comes from the file's header: SDXL's rules apply with no flag (kohya's separate
    sdxl_train_network.py), and its own switches are accepted."""
    base = _base(tmp_path / "base", mini_sdxl_checkpoint)
    data = _dataset(tmp_path / "data")
    common = ["train-lora", "--base-directory", str(base), "--pretrained_model_name_or_path"]
    common += ["mini_sdxl.safetensors", "--train_data_dir", str(data), "--output_name", "x"]
    assert main([*common, "--bucket_reso_steps", "48"]) != 0
    assert "for SDXL it must be divisible by 32" in capsys.readouterr().err
    assert main([*common, "--cache_text_encoder_outputs", "--disable_mmap_load_safetensors"]) != 0
    assert "--cache_text_encoder_outputs needs --network_train_unet_only" in capsys.readouterr().err
    assert not list((base / "models" / "loras").iterdir())


def test_an_sdxl_refiner_is_refused_by_name(tmp_path: Path, models: LoadedCheckpoint) -> None:
    refiner = replace(models, family="sdxl_refiner")
    request = TrainRequest("ref.safetensors", _dataset(tmp_path / "d"), "r", TrainOptions(), steps=1)
    base = tmp_path / "b"
    (base / "models" / "loras").mkdir(parents=True)
    with pytest.raises(TrainError, match="an SDXL refiner checkpoint; train-lora trains SD1.x and SDXL base"):
        train_lora(Folders.at(base), request, models=refiner)


def test_text_encoder_lr_list_trains_both_encoders_at_the_first_value(
    models: LoadedCheckpoint, tmp_path: Path
) -> None:
    """`--text_encoder_lr 1e-5 2e-5` on SDXL: kohya's networks.lora gives CLIP-L and bigG the first."""
    from nodegraph import train_config
    from nodes.train.request import from_values

    given = {"pretrained_model_name_or_path": "m", "train_data_dir": tmp_path, "output_name": "x"}
    values, _ = train_config.resolve(given | {"text_encoder_lr": [1e-5, 2e-5], "learning_rate": 1e-3})
    options = replace(
        from_values(values).options,
        rank=1,
        resolution=(128, 128),
        min_bucket_reso=64,
        max_bucket_reso=256,
        bucket_reso_steps=32,
    )
    trainer = LoraTrainer(models, load_dataset(_dataset(tmp_path)), options)
    try:
        unet_group, te_group = trainer.optimizer.param_groups
        te_params = {id(p) for p in trainer.network.te_loras.parameters()}
        prefixes = {m.lora_name[:8] for m in trainer.network.loras() if m.lora_name.startswith("lora_te")}
    finally:
        trainer.close()
    assert (unet_group["lr"], te_group["lr"]) == (1e-3, 1e-5)
    assert {id(p) for p in te_group["params"]} == te_params and prefixes == {"lora_te1", "lora_te2"}


def test_text_encoder_outputs_are_cached_to_disk_in_kohyas_files(
    models: LoadedCheckpoint, mini_sdxl_checkpoint: Path, tmp_path: Path
) -> None:
    """`--cache_text_encoder_outputs_to_disk`: `<image>_te_outputs.npz` beside each image with kohya's
    arrays, the values the in-memory path computes; a second run reads them and trains the same LoRA
    bit for bit; a changed caption, or kohya's own file (nothing says what made it), is encoded
    again."""
    base = _base(tmp_path / "base", mini_sdxl_checkpoint)
    data = _dataset(tmp_path / "data")
    folder = data / FOLDER
    options = _options(rank=2, alpha=2, learning_rate=1e-3, batch_size=2, seed=3, train_text_encoder=False)
    cached = replace(options, cache_text_encoder_outputs_to_disk=True)

    def train(name: str, opts: TrainOptions) -> tuple[dict[str, torch.Tensor], list[str]]:
        notices: list[str] = []
        request = TrainRequest(
            "mini_sdxl.safetensors", data, name, opts, steps=1, cache_text_encoder_outputs=True
        )
        (path,) = train_lora(
            Folders.at(base), request, models=models, hooks=TrainHooks(notice=notices.append)
        )
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, notices  # noqa: SIM118

    first, notices = train("first", cached)
    assert not [n for n in notices if "_te_outputs" in n]
    files = sorted(p.name for p in folder.glob("*_te_outputs.npz"))
    assert files == ["square_te_outputs.npz", "wide_te_outputs.npz", "wider_te_outputs.npz"]
    trainer = LoraTrainer(models, load_dataset(data), options)
    try:
        hidden, pooled = trainer.encode(["zzkx cube, wide"])  # the in-memory cache's computation
    finally:
        trainer.close()
    assert pooled is not None
    with np.load(folder / "wide_te_outputs.npz") as npz:
        assert {"hidden_state1", "hidden_state2", "pool2"} <= set(npz.files)
        assert npz["hidden_state1"].shape == (77, 768) and npz["hidden_state2"].shape == (77, 1280)
        assert npz["pool2"].shape == (1280,) and str(npz["caption"]) == "zzkx cube, wide"
        torch.testing.assert_close(torch.from_numpy(npz["hidden_state1"]), hidden[0, :, :768])
        torch.testing.assert_close(torch.from_numpy(npz["hidden_state2"]), hidden[0, :, 768:])
        torch.testing.assert_close(torch.from_numpy(npz["pool2"]), pooled[0])
    again, notices = train("again", cached)
    assert "text encoder outputs of 3 images read from their _te_outputs.npz files" in notices
    assert all(torch.equal(again[k], first[k]) for k in first)
    # kohya's file: its three arrays only (zeros here, to see they are not used); a new caption
    zeros = {
        "hidden_state1": np.zeros((77, 768)),
        "hidden_state2": np.zeros((77, 1280)),
        "pool2": np.zeros(1280),
    }
    np.savez(folder / "wide_te_outputs.npz", **zeros)  # type: ignore[arg-type]
    (folder / "square.txt").write_text("zzkx cube, a new caption\n", encoding="utf-8")
    _, notices = train("third", cached)
    assert "text encoder outputs of 1 images read from their _te_outputs.npz files" in notices
    with np.load(folder / "wide_te_outputs.npz") as npz:
        torch.testing.assert_close(torch.from_numpy(npz["hidden_state1"]), hidden[0, :, :768])
    with np.load(folder / "square_te_outputs.npz") as npz:
        assert str(npz["caption"]) == "zzkx cube, a new caption"
