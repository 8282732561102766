"""ImageStitch against ComfyUI's rules, the expected images built by hand (and Pillow's Lanczos)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.testing import RecordingContext
from nodes.image_stitch import ImageStitch


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_padding_spacing_and_order_without_resizing(ctx: RecordingContext) -> None:
    a, b = rand(1, 4, 5, 3), rand(2, 7, 3, 3, seed=1)
    (out,) = ImageStitch().run(ctx, a, "left", False, 3, "red", b)
    # batch 2 (a's last image repeated); heights padded to 7 with 0 (a colour pads black); spacing 4
    assert out.shape == (2, 7, 3 + 4 + 5, 3)
    assert torch.equal(out[:, :, :3], b)
    strip = out[:, :, 3:7]
    assert torch.equal(strip, torch.tensor([1.0, 0.0, 0.0]).expand(2, 7, 4, 3))
    want_a = torch.zeros(2, 7, 5, 3)
    want_a[:, 1:5] = a  # (7 - 4) // 2 = 1 row above, 2 below
    assert torch.equal(out[:, :, 7:], want_a)


def test_down_with_matched_size_resizes_by_lanczos(ctx: RecordingContext) -> None:
    a, b = rand(1, 4, 8, 3), rand(1, 8, 4, 3, seed=2)
    (out,) = ImageStitch().run(ctx, a, "down", True, 0, "white", b)
    pixels = np.clip(255.0 * b[0].numpy(), 0, 255).astype(np.uint8)
    resized = Image.fromarray(pixels).resize((8, 16), resample=Image.Resampling.LANCZOS)
    want = torch.from_numpy(np.array(resized).astype(np.float32) / 255.0)
    assert out.shape == (1, 4 + 16, 8, 3)
    assert torch.equal(out[0, :4], a[0]) and torch.allclose(out[0, 4:], want)


def test_alpha_is_added_where_missing_and_none_passes_through(ctx: RecordingContext) -> None:
    a, b = rand(1, 4, 4, 4), rand(1, 4, 4, 3, seed=3)
    (out,) = ImageStitch().run(ctx, a, "right", False, 2, "white", b)
    assert out.shape == (1, 4, 10, 4)
    assert torch.equal(out[..., 6:, 3], torch.ones(1, 4, 4)) and torch.equal(
        out[..., 4:6, :], torch.ones(1, 4, 2, 4)
    )
    assert ImageStitch().run(ctx, a, "right", True, 0, "white", None)[0] is a
    with pytest.raises(ValueError, match="ImageStitch: input image2"):
        ImageStitch().run(ctx, a, "right", True, 0, "white", torch.zeros(4, 4))
