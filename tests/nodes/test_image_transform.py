"""Image nodes from nodes/image_transform.py: sizes, crop, Lanczos against Pillow, colours, declarations."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from nodegraph.testing import RecordingContext
from nodes.image_transform import EmptyImage, ImageBatch, ImageInvert, ImageScale, ImageScaleBy

METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


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
