"""Alpha nodes and Morphology against the textbook formulas, written out independently."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from nodegraph.testing import RecordingContext
from nodes.image_alpha import JoinImageWithAlpha, PorterDuffImageComposite, SplitImageWithAlpha
from nodes.image_morphology import Morphology


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_split_and_join_convert_alpha_to_comfyuis_mask(ctx: RecordingContext) -> None:
    rgba = rand(2, 5, 6, 4)
    rgb, mask = SplitImageWithAlpha().run(ctx, rgba)
    assert torch.equal(rgb, rgba[..., :3]) and torch.allclose(mask, 1 - rgba[..., 3])
    _, opaque = SplitImageWithAlpha().run(ctx, rgba[..., :3])
    assert torch.equal(opaque, torch.zeros(2, 5, 6))
    (joined,) = JoinImageWithAlpha().run(ctx, rgb, mask)
    torch.testing.assert_close(joined, rgba)
    (one_mask,) = JoinImageWithAlpha().run(ctx, rgb, torch.zeros(10, 12))  # resized, batched
    assert one_mask.shape == (2, 5, 6, 4) and torch.equal(one_mask[..., 3], torch.ones(2, 5, 6))


def _straight(mode: str, cs: torch.Tensor, a_s: torch.Tensor, cd: torch.Tensor, a_d: torch.Tensor) -> tuple:
    """Porter & Duff (1984) with straight colours: F_a, F_b per operator, then un-premultiply."""
    fa, fb, colour = {
        "SRC_OVER": (1, 1 - a_s, None),
        "DST_OVER": (1 - a_d, 1, None),
        "SRC_IN": (a_d, 0, None),
        "DST_OUT": (0, 1 - a_s, None),
        "XOR": (1 - a_d, 1 - a_s, None),
    }[mode]
    alpha = a_s * fa + a_d * fb
    premul = cs * a_s * fa + cd * a_d * fb if colour is None else colour
    return torch.where(alpha > 1e-5, premul / alpha, 0).clamp(0, 1), alpha


@pytest.mark.parametrize("mode", ["SRC_OVER", "DST_OVER", "SRC_IN", "DST_OUT", "XOR"])
def test_porter_duff_operators(ctx: RecordingContext, mode: str) -> None:
    src, dst = rand(2, 4, 4, 3), rand(2, 4, 4, 3, seed=1)
    src_mask, dst_mask = rand(2, 4, 4, seed=2), rand(2, 4, 4, seed=3)
    image, mask = PorterDuffImageComposite().run(ctx, src, src_mask, dst, dst_mask, mode)
    want, alpha = _straight(mode, src, 1 - src_mask[..., None], dst, 1 - dst_mask[..., None])
    torch.testing.assert_close(image, want)
    torch.testing.assert_close(mask, 1 - alpha[..., 0])


def test_porter_duff_fits_the_source_to_the_destination(ctx: RecordingContext) -> None:
    src, dst = rand(1, 8, 8, 3), rand(1, 4, 4, 3, seed=1)
    image, _ = PorterDuffImageComposite().run(
        ctx, src, torch.zeros(1, 8, 8), dst, torch.zeros(1, 4, 4), "SRC"
    )
    fitted = F.interpolate(src.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic").permute(0, 2, 3, 1)
    torch.testing.assert_close(image, fitted.clamp(0, 1))
    with pytest.raises(ValueError, match="PorterDuffImageComposite: source has 4 channels"):
        PorterDuffImageComposite().run(
            ctx, rand(1, 4, 4, 4), torch.zeros(1, 4, 4), dst, torch.zeros(1, 4, 4), "SRC"
        )


def _pool(x: torch.Tensor, k: int, sign: float) -> torch.Tensor:
    """Max (sign 1) or min (sign -1) over a k×k window; outside the image never wins."""
    pad = (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2)
    padded = F.pad(sign * x.movedim(-1, 1), pad, value=-float("inf"))
    return (sign * F.max_pool2d(padded, k, stride=1)).movedim(1, -1)


@pytest.mark.parametrize("k", [3, 5])
def test_morphology_is_min_and_max_over_the_kernel(ctx: RecordingContext, k: int) -> None:
    image = rand(2, 9, 7, 3)
    run = lambda op: Morphology().run(ctx, image, op, k)[0]  # noqa: E731
    erode, dilate = _pool(image, k, -1), _pool(image, k, 1)
    torch.testing.assert_close(run("erode"), erode)
    torch.testing.assert_close(run("dilate"), dilate)
    torch.testing.assert_close(run("open"), _pool(erode, k, 1))
    torch.testing.assert_close(run("close"), _pool(dilate, k, -1))
    torch.testing.assert_close(run("gradient"), dilate - erode)
    torch.testing.assert_close(run("top_hat"), image - _pool(erode, k, 1))
    torch.testing.assert_close(run("bottom_hat"), _pool(dilate, k, -1) - image)
