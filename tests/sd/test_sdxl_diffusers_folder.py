"""A diffusers SDXL folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, fp16-variant weights
as `save_pretrained(variant="fp16")` writes them) made from the mini SDXL checkpoint loads to the same
modules and gives the same image as the single file.

The file is the mini checkpoint with its text encoders cut to two layers (tests/sd/sdxl_files.py), so
the two copies of the model this test holds stay near 4 GB; the UNet and VAE are the mini's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.loaders import CheckpointLoaderSimple, DiffusersLoader, model_store
from nodes.sd.checkpoint import weights_variant
from tests.sd.sdxl_files import render, write_depth_variant, write_diffusers_folder

pytestmark = pytest.mark.slow


def test_the_folder_gives_the_single_file_image(tmp_path: Path, mini_sdxl_checkpoint: Path) -> None:
    ckpts = tmp_path / "models" / "checkpoints"
    write_depth_variant(mini_sdxl_checkpoint, ckpts / "xl.safetensors", "mini")
    env = Environment(Folders.at(tmp_path))
    from_file: tuple[Any, Any, Any] = CheckpointLoaderSimple().run(RecordingContext(env), "xl.safetensors")
    folder = write_diffusers_folder(
        model_store(env).checkpoint(ckpts / "xl.safetensors"),
        tmp_path / "models" / "diffusers" / "xl",
    )
    assert weights_variant(folder / "text_encoder_2") == "fp16"
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    from_folder: tuple[Any, Any, Any] = DiffusersLoader().run(RecordingContext(env), "xl")
    model, clip, vae = from_folder
    assert model.family == clip.family == "sdxl" and vae.scaling_factor == pytest.approx(0.13025)
    assert type(clip.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for a, b in zip(from_folder, from_file, strict=True):
        for module in ("unet", "text_encoder", "text_encoder_2", "vae"):
            if hasattr(a, module):
                got, want = getattr(a, module).state_dict(), getattr(b, module).state_dict()
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in got), module
    latent_folder, image_folder = render(RecordingContext(env), from_folder)
    latent_file, image_file = render(RecordingContext(env), from_file)
    assert torch.equal(latent_folder, latent_file) and torch.equal(image_folder, image_file)
