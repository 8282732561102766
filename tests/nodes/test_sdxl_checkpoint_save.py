"""CheckpointSave on SDXL: the SGM single file ComfyUI loads, read back by our loader as SDXL.

The mini SDXL checkpoint is the oracle generator's file, which ComfyUI detects and loads with no
missing keys: saved without LoRAs, every tensor comes back under the same key with the same fp16
bytes (bigG's q/k/v fused back into `in_proj`, its projection transposed back). Saved with a LoRA,
the file loads as SDXL with the patched text encoders' exact weights and the patched UNet's output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.lora import LoraLoader
from nodes.model_save import CheckpointSave
from nodes.sd.checkpoint import LoadedCheckpoint, SafetensorsSource, load_checkpoint
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sd.patcher import patched, patched_clip, restore

LORA = "mini_sdxl_lora.safetensors"


@pytest.fixture(scope="module")
def sdxl(sdxl_store: Any, mini_sdxl_checkpoint: Path) -> LoadedCheckpoint:
    loaded: LoadedCheckpoint = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    return loaded


def _setup(
    tmp_path: Path, sdxl: LoadedCheckpoint, loras: Path
) -> tuple[Any, ModelHandle, ClipHandle, VaeHandle]:
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / LORA).symlink_to(loras / LORA)
    ctx = RecordingContext(Environment(Folders.at(tmp_path)))
    name = "mini_sdxl.safetensors"
    model = ModelHandle(sdxl.unet, name, sdxl.family)
    clip = ClipHandle(sdxl.text_encoder, None, name, sdxl.family, text_encoder_2=sdxl.text_encoder_2)
    return ctx, model, clip, VaeHandle(sdxl.vae, name, 0.13025)


def _digests(module: Any) -> dict[str, str]:
    return {
        n: hashlib.sha1(p.detach().contiguous().view(torch.uint8).numpy()).hexdigest()
        for n, p in module.named_parameters()
    }


def _unet_out(unet: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 2048, generator=gen)
    added = {"text_embeds": torch.randn(1, 1280, generator=gen), "time_ids": torch.tensor([[64.0] * 6])}
    with torch.inference_mode():
        out: torch.Tensor = unet(x, torch.tensor([500.0]), ctx, added_cond_kwargs=added).sample
        return out.clone()


def test_saved_without_loras_is_the_source_file_tensor_for_tensor(
    tmp_path: Path, sdxl: LoadedCheckpoint, mini_sdxl_checkpoint: Path, mini_sdxl_loras: Path
) -> None:
    ctx, model, clip, vae = _setup(tmp_path, sdxl, mini_sdxl_loras)
    CheckpointSave().run(ctx, model, clip, vae, "checkpoints/sdxl")
    saved = SafetensorsSource(tmp_path / "output" / "checkpoints" / "sdxl_00001_.safetensors")
    source = SafetensorsSource(mini_sdxl_checkpoint)
    assert saved.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert set(saved.keys()) == set(source.keys())  # SGM names, as ComfyUI's SDXL detection reads them
    for key in source.keys():
        got, want = saved.get(key), source.get(key)
        assert got.dtype == want.dtype == torch.float16 and torch.equal(got, want), key


def test_saved_with_a_lora_loads_back_as_sdxl_with_the_patched_weights(
    tmp_path: Path, sdxl: LoadedCheckpoint, mini_sdxl_loras: Path
) -> None:
    ctx, model, clip, vae = _setup(tmp_path, sdxl, mini_sdxl_loras)
    model, clip = LoraLoader().run(ctx, model, clip, LORA, 0.9, -0.6)
    CheckpointSave().run(ctx, model, clip, vae, "checkpoints/sdxl")
    try:
        restore(sdxl.unet)  # CheckpointSave leaves the stack fused (the next run with it is free)
        base = _unet_out(sdxl.unet)
        with patched(model.unet, model.loras, target="unet", exact=True), patched_clip(clip):
            want = _unet_out(model.unet)
            te_l, te_g = _digests(sdxl.text_encoder), _digests(sdxl.text_encoder_2)
    finally:
        restore(sdxl.unet)
        restore(sdxl.text_encoder)
        restore(sdxl.text_encoder_2)
    back = load_checkpoint(tmp_path / "output" / "checkpoints" / "sdxl_00001_.safetensors")
    assert back.family == "sdxl" and back.text_encoder_2 is not None
    assert _digests(back.text_encoder) == te_l  # fp16-valued: exact through the fp16 file
    assert _digests(back.text_encoder_2) == te_g
    assert _digests(back.vae) == _digests(sdxl.vae)
    got = _unet_out(back.unet)
    assert (got - want).abs().max() < 1e-2 * (want - base).abs().max()  # only the fp16 storage differs


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
