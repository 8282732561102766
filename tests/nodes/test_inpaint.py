"""Mask/inpaint nodes: SetLatentNoiseMask, VAEEncodeForInpaint's pixel and mask preparation, LoadImageMask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes.image import ImageFileError
from nodes.inpaint import LoadImageMask, SetLatentNoiseMask, VAEEncodeForInpaint, inpaint_pixels
from nodes.loaders import CheckpointLoaderSimple


def test_set_latent_noise_mask_reshapes(ctx: RecordingContext) -> None:
    src = {"samples": torch.zeros(1, 4, 8, 8)}
    (out,) = SetLatentNoiseMask().run(ctx, src, torch.ones(64, 64))
    assert out["noise_mask"].shape == (1, 1, 64, 64) and "noise_mask" not in src


def test_inpaint_pixels_crop_grey_and_grow() -> None:
    pixels = torch.rand(1, 70, 67, 3)  # cropped to 64 x 64 at offset (3, 1)
    mask = torch.zeros(1, 70, 67)
    mask[0, 3 + 10, 1 + 20] = 1.0
    mask[0, 3 + 40, 1 + 5] = 0.6  # rounds to 1
    mask[0, 3 + 50, 1 + 50] = 0.4  # rounds to 0
    prepared, noise_mask = inpaint_pixels(pixels, mask, 6)
    assert prepared.shape == (1, 64, 64, 3) and noise_mask.shape == (1, 1, 64, 64)
    expected_pixels = pixels[:, 3:67, 1:65].clone()
    expected_pixels[0, 10, 20] = 0.5
    expected_pixels[0, 40, 5] = 0.5
    assert torch.allclose(prepared, expected_pixels, atol=1e-6)
    # a 6x6 kernel with padding 3 spreads one pixel over rows/columns p-2 .. p+3
    expected = np.zeros((64, 64), dtype=np.float32)
    for r, c in ((10, 20), (40, 5)):
        expected[max(r - 2, 0) : r + 4, max(c - 2, 0) : c + 4] = 1.0
    assert np.array_equal(noise_mask[0, 0].numpy(), expected)
    _, ungrown = inpaint_pixels(pixels, mask, 0)
    assert float(ungrown.sum()) == 2.0


def test_inpaint_mask_is_resized_bilinear_to_the_image() -> None:
    pixels = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:4, 2:4] = 1.0
    prepared, noise_mask = inpaint_pixels(pixels, mask, 0)
    big = torch.nn.functional.interpolate(mask.reshape(1, 1, 8, 8), size=(64, 64), mode="bilinear")
    assert torch.equal(noise_mask, big.round())
    grey = big.round()[0, 0].bool()
    assert torch.all(prepared[0][grey] == 0.5) and torch.equal(prepared[0][~grey], pixels[0][~grey])


def test_vae_encode_for_inpaint_gives_latent_and_noise_mask(models_env: Environment) -> None:
    ctx = RecordingContext(models_env)
    vae = CheckpointLoaderSimple().run(ctx, "mini.safetensors")[2]
    mask = torch.zeros(1, 64, 64)
    mask[0, 16:48, 16:48] = 1.0
    (latent,) = VAEEncodeForInpaint().run(ctx, torch.rand(1, 64, 64, 3), vae, mask, 6)
    assert latent["samples"].shape == (1, 4, 8, 8) and latent["noise_mask"].shape == (1, 1, 64, 64)
    assert float(latent["noise_mask"].sum()) == 37 * 37  # 32 + 2 before + 3 after on each axis


def test_load_image_mask_channels(env: Environment, ctx: RecordingContext) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(Path(env.folders.input_dir) / "m.png")
    (alpha,) = LoadImageMask().run(ctx, "m.png", "alpha")
    assert alpha.shape == (1, 6, 5)
    assert torch.allclose(alpha[0], 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0))
    (green,) = LoadImageMask().run(ctx, "m.png", "green")
    assert torch.equal(green[0], torch.from_numpy(rgba[..., 1].astype(np.float32) / 255.0))
    gray = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    Image.fromarray(gray, "L").save(Path(env.folders.input_dir) / "g.png")
    (red,) = LoadImageMask().run(ctx, "g.png", "red")
    assert torch.equal(red[0], torch.from_numpy(gray.astype(np.float32) / 255.0))
    (opaque,) = LoadImageMask().run(ctx, "g.png", "alpha")  # no alpha band: fully opaque, mask 0
    assert opaque.shape == (1, 6, 5) and not opaque.any()
    assert LoadImageMask.input("image").check(env, "m.png") is None
    assert LoadImageMask.input("image").check(env, "missing.png") == "Invalid image file: missing.png"
    assert LoadImageMask.input("image").fingerprint(env, "m.png") != LoadImageMask.input("image").fingerprint(
        env, "g.png"
    )


def test_load_image_mask_that_is_not_an_image_names_the_file(env: Environment, ctx: RecordingContext) -> None:
    (Path(env.folders.input_dir) / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageFileError, match="'bad.png'"):
        LoadImageMask().run(ctx, "bad.png", "alpha")


def test_ui_workflow_load_image_mask_keeps_its_channel() -> None:
    from nodegraph.graph import ui_to_api
    from nodegraph.registry import Registry
    from nodes import all_nodes

    node = {"id": 2, "type": "LoadImageMask", "inputs": [], "outputs": [], "mode": 0}
    ui = {"nodes": [node | {"widgets_values": ["m.png", "red", "image"]}], "links": []}
    api = ui_to_api(ui, Registry(all_nodes()))
    assert api["2"]["inputs"] == {"image": "m.png", "channel": "red"}
