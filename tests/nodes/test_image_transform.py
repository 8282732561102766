"""Image nodes from nodes/image_transform.py: sizes, crop, Lanczos against Pillow, colours, declarations."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes.image_transform import EmptyImage, ImageBatch, ImageInvert, ImageScale, ImageScaleBy

METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


def test_declarations_are_comfyuis(env: Environment) -> None:
    info = ImageScale.info(env)
    req = info["input"]["required"]
    assert info["input_order"]["required"] == ["image", "upscale_method", "width", "height", "crop"]
    assert req["upscale_method"][0] == METHODS and req["crop"][0] == ["disabled", "center"]
    assert req["width"][1] == {"default": 512, "min": 0, "max": 16384, "step": 1}
    assert (info["category"], info["display_name"]) == ("image/upscaling", "Upscale Image")
    info = ImageScaleBy.info(env)
    assert info["input_order"]["required"] == ["image", "upscale_method", "scale_by"]
    assert info["input"]["required"]["scale_by"][1] == {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}
    assert (info["category"], info["display_name"]) == ("image/upscaling", "Upscale Image By")
    info = EmptyImage.info(env)
    req = info["input"]["required"]
    assert info["input_order"]["required"] == ["width", "height", "batch_size", "color"]
    assert req["width"][1] == {"default": 512, "min": 1, "max": 16384, "step": 1}
    assert req["batch_size"][1] == {"default": 1, "min": 1, "max": 4096, "step": 1}
    assert req["color"][1] == {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}
    assert (info["category"], info["display_name"]) == ("image", "EmptyImage")
    assert (ImageInvert.info(env)["display_name"], ImageBatch.info(env)["display_name"]) == (
        "Invert Image",
        "Batch Images",
    )
    assert ImageBatch.info(env)["input_order"]["required"] == ["image1", "image2"]


def test_scale_follows_aspect_for_a_zero_side_and_passes_through_zero_zero(ctx: RecordingContext) -> None:
    image = torch.rand(2, 30, 40, 3)
    (same,) = ImageScale().run(ctx, image, "bilinear", 0, 0, "disabled")
    assert same is image
    (out,) = ImageScale().run(ctx, image, "bilinear", 0, 15, "disabled")
    assert out.shape == (2, 15, 20, 3)
    expected = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(15, 20), mode="bilinear")
    assert torch.equal(out, expected.movedim(1, -1))
    (cropped,) = ImageScale().run(ctx, image, "nearest-exact", 30, 30, "center")
    assert cropped.shape == (2, 30, 30, 3) and torch.equal(cropped, image[:, :, 5:35])


def test_lanczos_is_pillows_on_8_bit_pixels(ctx: RecordingContext) -> None:
    image = torch.rand(1, 20, 24, 3)
    (out,) = ImageScaleBy().run(ctx, image, "lanczos", 1.5)
    assert out.shape == (1, 30, 36, 3)
    pil = Image.fromarray(np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8))
    expected = np.array(pil.resize((36, 30), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
    assert np.array_equal(out[0].numpy(), expected)
    (centre,) = ImageScale().run(ctx, image, "lanczos", 10, 10, "center")
    pil = Image.fromarray(np.clip(255.0 * image[0, :, 2:22].numpy(), 0, 255).astype(np.uint8))
    expected = np.array(pil.resize((10, 10), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
    assert np.array_equal(centre[0].numpy(), expected)


def test_invert_empty_and_batch(ctx: RecordingContext) -> None:
    image = torch.rand(1, 4, 4, 3)
    assert torch.equal(ImageInvert().run(ctx, image)[0], 1.0 - image)
    (empty,) = EmptyImage().run(ctx, 5, 3, 2, 0xFF8000)
    assert empty.shape == (2, 3, 5, 3)
    assert torch.equal(empty[1, 2, 4], torch.tensor([1.0, 128 / 255, 0.0], dtype=torch.float32))
    other = torch.rand(1, 8, 16, 3)
    (batch,) = ImageBatch().run(ctx, image, other)
    assert batch.shape == (2, 4, 4, 3) and torch.equal(batch[0], image[0])
    expected = torch.nn.functional.interpolate(other[:, :, 4:12].movedim(-1, 1), size=(4, 4), mode="bilinear")
    assert torch.allclose(batch[1:], expected.movedim(1, -1))
