"""VAEDecodeTiled/VAEEncodeTiled: ComfyUI's declarations, its blending weights, and agreement with
the untiled VAE nodes on the oracle's mini checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodegraph.env import Environment
from nodegraph.registry import Registry
from nodegraph.testing import RecordingContext
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.image import VAEDecode, VAEEncode
from nodes.loaders import CheckpointLoaderSimple
from nodes.sd.handles import VaeHandle
from nodes.sd.vae_tiled import TileSizeError, feather_weights, tiled_scale
from nodes.vae_tiled import VAEDecodeTiled, VAEEncodeTiled
from tests.conftest import assert_within_floor

TEMPORAL = {"temporal_size": 64, "temporal_overlap": 8}


@pytest.fixture(scope="module")
def vae(models_env: Environment) -> VaeHandle:
    handle: VaeHandle = CheckpointLoaderSimple().run(RecordingContext(models_env), "mini.safetensors")[2]
    return handle


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    """A 72x40 image's latent (9x5): no tile size divides it."""
    return torch.randn(2, 4, 5, 9, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(2, 40, 72, 3, generator=torch.Generator().manual_seed(1))


# ---- (a) one tile covering the image is the untiled node


def test_decode_with_a_tile_covering_the_image_equals_vae_decode(
    models_env: Environment, vae: VaeHandle, latent: torch.Tensor
) -> None:
    ctx = RecordingContext(models_env)
    (plain,) = VAEDecode().run(ctx, {"samples": latent}, vae)
    (tiled,) = VAEDecodeTiled().run(ctx, {"samples": latent}, vae, 512, 64, **TEMPORAL)
    assert tiled.shape == plain.shape == (2, 40, 72, 3)
    assert_within_floor(tiled, plain)


def test_encode_with_a_tile_covering_the_image_equals_vae_encode(
    models_env: Environment, vae: VaeHandle, pixels: torch.Tensor
) -> None:
    ctx = RecordingContext(models_env)
    (plain,) = VAEEncode().run(ctx, pixels, vae)
    (tiled,) = VAEEncodeTiled().run(ctx, pixels, vae, 512, 64, **TEMPORAL)
    assert tiled["samples"].shape == plain["samples"].shape == (2, 4, 5, 9)
    assert_within_floor(tiled["samples"], plain["samples"])


# ---- (b) small tiles: right shapes, close to the untiled result
#
# The mini checkpoint's VAE has random weights, and a VAE is not tile-local: GroupNorm takes its
# statistics over the whole tile, and the convolutions see zero padding at tile edges. So tiles
# of 64 px (8 latent px, barely more than the decoder's receptive field) differ from the whole
# image by a lot at some pixels. Measured (torch 2.x, CPU): decode 64/16 max 0.39, mean 0.041 on
# a [0, 1] image; decode 128/32 max 0.066; encode 64/16 max 0.52 against latents of max |1.83|.
# The bounds below leave some room; the blending itself is checked exactly by the tests below.


def test_decode_with_64px_tiles_is_close_and_keeps_the_shape(
    models_env: Environment, vae: VaeHandle, latent: torch.Tensor
) -> None:
    ctx = RecordingContext(models_env)
    (plain,) = VAEDecode().run(ctx, {"samples": latent}, vae)
    (small,) = VAEDecodeTiled().run(ctx, {"samples": latent}, vae, 64, 16, **TEMPORAL)
    (larger,) = VAEDecodeTiled().run(ctx, {"samples": latent}, vae, 128, 32, **TEMPORAL)
    assert small.shape == larger.shape == (2, 40, 72, 3)
    diff, diff_larger = (small - plain).abs(), (larger - plain).abs()
    assert float(diff.max()) <= 0.5 and float(diff.mean()) <= 0.06
    assert float(diff_larger.max()) <= 0.1 and float(diff_larger.mean()) < float(diff.mean())
    assert float(diff.mean()) > 1e-4  # tiles were really used


def test_encode_with_64px_tiles_is_close_and_keeps_the_shape(
    models_env: Environment, vae: VaeHandle, pixels: torch.Tensor
) -> None:
    ctx = RecordingContext(models_env)
    (plain,) = VAEEncode().run(ctx, pixels, vae)
    (tiled,) = VAEEncodeTiled().run(ctx, pixels, vae, 64, 16, **TEMPORAL)
    assert tiled["samples"].shape == (2, 4, 5, 9)
    diff = (tiled["samples"] - plain["samples"]).abs()
    assert 1e-4 < float(diff.max()) <= 0.7


def test_progress_counts_every_tile_of_the_three_tilings(
    models_env: Environment, vae: VaeHandle, latent: torch.Tensor
) -> None:
    ctx = RecordingContext(models_env)
    VAEDecodeTiled().run(ctx, {"samples": latent[:1]}, vae, 64, 16, **TEMPORAL)
    # 9x5 latent, overlap 2: 16x4 tiles -> 1 row x 4 cols, 4x16 -> 2 x 1, 8x8 -> 1 x 2.
    assert [(v, t) for v, t, _ in ctx.steps] == [(n, 8) for n in range(1, 9)]


def test_decode_keeps_the_overlap_at_most_a_quarter_of_the_tile(
    models_env: Environment, vae: VaeHandle, latent: torch.Tensor
) -> None:
    ctx = RecordingContext(models_env)
    (clamped,) = VAEDecodeTiled().run(ctx, {"samples": latent}, vae, 64, 64, **TEMPORAL)
    (quarter,) = VAEDecodeTiled().run(ctx, {"samples": latent}, vae, 64, 16, **TEMPORAL)
    assert torch.equal(clamped, quarter)


def test_encode_overlap_too_large_for_the_half_tile_is_a_clear_error(
    models_env: Environment, vae: VaeHandle, pixels: torch.Tensor
) -> None:
    # ComfyUI does not clamp the encode overlap: its 32 px half tile with a 32 px overlap makes
    # range() raise "arg 3 must not be zero". We say what to change instead.
    with pytest.raises(TileSizeError, match="overlap smaller than half the tile size"):
        VAEEncodeTiled().run(RecordingContext(models_env), pixels, vae, 64, 32, **TEMPORAL)


# ---- (c) the blending, against a re-implementation of ComfyUI's formula


def comfy_tiles_1d(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """tiled_scale_multidim's positions: range(0, size - overlap, tile - overlap), clamped."""
    if size <= tile:
        return [(0, size)]
    out = []
    for it in range(0, size - overlap, tile - overlap):
        pos = max(0, min(size - overlap, it))
        out.append((pos, min(tile, size - pos)))
    return out


def comfy_mask_1d(length: int, feather: int) -> np.ndarray:
    """mask.narrow(d, t, 1) *= (t + 1) / feather and the same from the far end, t < feather."""
    mask = np.ones(length)
    if feather < length:
        for t in range(feather):  # both ends, one after the other: a middle pixel gets both
            mask[t] *= (t + 1) / feather
            mask[length - 1 - t] *= (t + 1) / feather
    return mask


def test_feather_weights_are_comfyuis_mask() -> None:
    for length, feather in [(8, 2), (16, 16), (5, 4), (64, 16), (3, 0), (4, 2)]:
        expected = comfy_mask_1d(length, feather)
        assert np.allclose(feather_weights(length, feather).numpy(), expected, atol=0), (length, feather)
    assert feather_weights(4, 2).tolist() == [0.5, 1.0, 1.0, 0.5]
    # The two ramps meet in the middle and multiply there: 0.75 * 0.75.
    assert feather_weights(5, 4).tolist() == [0.25, 0.5, 0.5625, 0.5, 0.25]


@pytest.mark.parametrize(("size", "tile", "overlap", "scale"), [(10, 4, 2, 1), (9, 4, 1, 8), (21, 8, 3, 8)])
def test_one_dimensional_blend_matches_comfyuis_formula(
    size: int, tile: int, overlap: int, scale: int
) -> None:
    """Each tile returns a constant (its call number); every output pixel must be the
    mask-weighted mean of the constants of the tiles covering it."""
    calls: list[int] = []

    def function(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[-1])
        return torch.full((1, 1, x.shape[2] * scale, x.shape[3] * scale), float(len(calls)))

    samples = torch.zeros(1, 1, 1, size)
    out = tiled_scale(samples, function, (1, tile), overlap, scale, 1)[0, 0, 0].numpy()

    tiles = comfy_tiles_1d(size, tile, overlap)
    assert calls == [length for _, length in tiles]
    total, weight = np.zeros(size * scale), np.zeros(size * scale)
    for number, (pos, length) in enumerate(tiles, start=1):
        mask = comfy_mask_1d(length * scale, overlap * scale)
        total[pos * scale : (pos + length) * scale] += number * mask
        weight[pos * scale : (pos + length) * scale] += mask
    assert np.allclose(out, total / weight, atol=1e-6)
    assert len(tiles) > 2 and not np.allclose(out, np.round(out))  # overlaps were really blended


def test_a_local_function_gives_the_same_result_tiled_and_whole() -> None:
    """A pixel-local function has no seams: the blend of its tiles is the whole-image result."""

    def function(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x * 3.0).repeat_interleave(8, -1).repeat_interleave(8, -2)

    samples = torch.randn(2, 3, 13, 21, generator=torch.Generator().manual_seed(2))
    whole = function(samples)
    for tile, overlap in [((4, 16), 2), ((16, 4), 2), ((8, 8), 3), ((5, 7), 0)]:
        out = tiled_scale(samples, function, tile, overlap, 8, 3)
        assert torch.allclose(out, whole, atol=1e-6), (tile, overlap)


# ---- (d) declarations and validation


@pytest.mark.parametrize(
    ("tile_size", "kind"), [(32, "value_smaller_than_min"), (8192, "value_bigger_than_max")]
)
def test_tile_size_out_of_range_is_a_validation_error(
    models_env: Environment, tile_size: int, kind: str
) -> None:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {
            "class_type": "VAEDecodeTiled",
            "inputs": {
                "samples": ["2", 0],
                "vae": ["1", 2],
                "tile_size": tile_size,
                "overlap": 64,
                **TEMPORAL,
            },
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "t"}},
    }
    result = validate_prompt(prompt, Registry(all_nodes()), models_env)
    assert not result.ok
    (err,) = result.node_errors["3"]["errors"]
    assert err["type"] == kind and err["extra_info"]["input_name"] == "tile_size"
