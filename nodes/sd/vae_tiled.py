"""Tiled VAE decode and encode with ComfyUI's numbers (`comfy/sd.py` VAE.decode_tiled_ and
encode_tiled_, `comfy/utils.py` tiled_scale_multidim, ComfyUI 0.3.64).

The VAE runs on overlapping tiles; each tile's output is weighted by a feathered mask that ramps
linearly over the overlap, and every output pixel is the mask-weighted mean of the tiles covering
it. ComfyUI does this for three tile shapes (t/2 x 2t, 2t x t/2, t x t) and averages the three
results, which hides the seams of any single tiling; so do we, in the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nodes.sd import vae as vae_math
from nodes.sd.checkpoint import PixelSpaceVae
from nodes.sd.device import where

TileFunction = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[], None]

DOWNSCALE = 8  # the SD VAE's spatial ratio (ComfyUI's vae.spacial_compression_decode())


class TileSizeError(ValueError):
    """The overlap leaves no room for a tile to advance (ComfyUI would crash or return NaN)."""


def tile_positions(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, length) of each tile along one axis, as tiled_scale_multidim places them.

    Starts step by `tile - overlap` from 0 while below `size - overlap`; the last tile is not
    moved back to end at the border, it is cut short there.
    """
    if size <= tile:
        return [(0, size)]
    if tile <= overlap:
        raise TileSizeError(
            f"a tile of {tile} with an overlap of {overlap} cannot cover {size}: "
            "make the overlap smaller than half the tile size"
        )
    starts = range(0, size - overlap, tile - overlap)
    return [(p, min(tile, size - p)) for p in (max(0, min(size - overlap, s)) for s in starts)]


def feather_weights(length: int, feather: int) -> torch.Tensor:
    """One axis of ComfyUI's blending mask: ramps (t+1)/feather at both ends, 1 in between.

    The two ramps multiply where they meet (a tile shorter than twice the feather). A feather that
    is not shorter than the tile leaves the axis unweighted, as ComfyUI skips it.
    """
    weights = torch.ones(length)
    if feather >= length:
        return weights
    for t in range(feather):
        a = (t + 1) / feather
        weights[t] *= a
        weights[length - 1 - t] *= a
    return weights


def tiled_scale(
    samples: torch.Tensor,
    function: TileFunction,
    tile: tuple[int, int],
    overlap: int,
    scale: float,
    out_channels: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run `function` on overlapping (height, width) tiles of `samples` [B, C, H, W] and blend.

    `scale` maps input to output pixels (8 to decode, 1/8 to encode); `overlap` is in input pixels.
    """
    height, width = samples.shape[2], samples.shape[3]
    out_h, out_w = round(height * scale), round(width * scale)
    output = torch.empty(samples.shape[0], out_channels, out_h, out_w)
    feather = round(overlap * scale)
    for b in range(samples.shape[0]):
        s = samples[b : b + 1]
        # 1. The whole input fits in one tile: one plain call, no mask.
        if height <= tile[0] and width <= tile[1]:
            output[b : b + 1] = function(s).float()
            if progress is not None:
                progress()
            continue
        # 2. Accumulate mask-weighted tiles and the masks, then divide.
        total = torch.zeros(1, out_channels, out_h, out_w)
        weight = torch.zeros(1, 1, out_h, out_w)
        rows = tile_positions(height, tile[0], overlap)
        cols = tile_positions(width, tile[1], overlap)
        for (y, h), (x, w) in itertools.product(rows, cols):
            part = function(s[:, :, y : y + h, x : x + w]).float()
            mask = feather_weights(part.shape[2], feather)[:, None] * feather_weights(part.shape[3], feather)
            oy, ox = round(y * scale), round(x * scale)
            ph, pw = min(part.shape[2], out_h - oy), min(part.shape[3], out_w - ox)
            mask = mask[None, None, :ph, :pw]
            total[:, :, oy : oy + ph, ox : ox + pw] += part[:, :, :ph, :pw] * mask
            weight[:, :, oy : oy + ph, ox : ox + pw] += mask
            if progress is not None:
                progress()
        output[b : b + 1] = total / weight
    return output


def tile_count(height: int, width: int, tiles: Sequence[tuple[int, int]], overlap: int) -> int:
    """How many VAE calls one image takes over the given tile shapes (for the progress bar)."""
    count = 0
    for th, tw in tiles:
        if height <= th and width <= tw:
            count += 1
        else:
            count += len(tile_positions(height, th, overlap)) * len(tile_positions(width, tw, overlap))
    return count


def _three_shapes(tile_x: int, tile_y: int, decode: bool) -> list[tuple[int, int]]:
    """(height, width) of ComfyUI's three tilings, in the order it sums them."""
    if decode:
        return [(tile_y * 2, tile_x // 2), (tile_y // 2, tile_x * 2), (tile_y, tile_x)]
    return [(tile_y, tile_x), (tile_y // 2, tile_x * 2), (tile_y * 2, tile_x // 2)]


def decode_tiled(
    vae: Any,
    latent: torch.Tensor,
    tile_x: int = 64,
    tile_y: int = 64,
    overlap: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Latent [B, 4, h, w] -> image [B, 8h, 8w, 3]; tile sizes and overlap in latent pixels."""
    if isinstance(vae, PixelSpaceVae):
        return vae_math.decode(vae, latent)
    channels = vae.config.latent_channels
    if latent.ndim != 4 or latent.shape[1] != channels:
        raise vae_math.VaeInputError(
            f"the VAE needs a latent of shape [B, {channels}, h, w], got {list(latent.shape)}"
        )

    device, dtype = where(vae)

    def decode_tile(z: torch.Tensor) -> torch.Tensor:
        z = z.to(device, dtype)
        if getattr(vae, "post_quant_conv", None) is not None:
            z = vae.post_quant_conv(z)
        decoded: torch.Tensor = vae.decoder(z)
        return decoded.cpu().float()

    shapes = _three_shapes(tile_x, tile_y, decode=True)
    tick = ticker(progress, latent.shape[0] * tile_count(latent.shape[2], latent.shape[3], shapes, overlap))
    with torch.inference_mode():
        z = latent.to(torch.float32)
        a, b, c = (tiled_scale(z, decode_tile, s, overlap, DOWNSCALE, 3, tick) for s in shapes)
        image = torch.clamp(((a + b + c) / 3.0 + 1.0) / 2.0, min=0.0, max=1.0)
    return image.movedim(1, -1).contiguous().clone()


def encode_tiled(
    vae: Any,
    pixels: torch.Tensor,
    tile_x: int = 512,
    tile_y: int = 512,
    overlap: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Image [B, H, W, C] -> latent [B, 4, H/8, W/8]; tile sizes and overlap in image pixels."""
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise vae_math.VaeInputError(
            f"the VAE needs an image of shape [B, H, W, 3], got {list(pixels.shape)}"
        )
    if isinstance(vae, PixelSpaceVae):
        return vae_math.encode(vae, pixels)
    pixels = vae_math.crop_to_multiple(pixels[:, :, :, :3])
    if pixels.shape[1] < 8 or pixels.shape[2] < 8:
        raise vae_math.VaeInputError(
            f"an image of {pixels.shape[2]}x{pixels.shape[1]} is too small to encode (8x8 at least)"
        )

    device, dtype = where(vae)

    def encode_tile(x: torch.Tensor) -> torch.Tensor:
        h = vae.encoder((x * 2.0 - 1.0).to(device, dtype))
        if getattr(vae, "quant_conv", None) is not None:
            h = vae.quant_conv(h)
        return torch.chunk(h, 2, dim=1)[0].cpu().float()  # the posterior mean

    shapes = _three_shapes(tile_x, tile_y, decode=False)
    tick = ticker(progress, pixels.shape[0] * tile_count(pixels.shape[1], pixels.shape[2], shapes, overlap))
    channels = vae.config.latent_channels
    with torch.inference_mode():
        x = pixels.movedim(-1, 1).to(torch.float32)
        a, b, c = (tiled_scale(x, encode_tile, s, overlap, 1 / DOWNSCALE, channels, tick) for s in shapes)
        samples = (a + b + c) / 3.0
    return samples.contiguous().clone()


def ticker(progress: Callable[[int, int], None] | None, total: int) -> Progress | None:
    """A no-argument callback that reports one more finished tile of `total`."""
    if progress is None:
        return None
    done = [0]

    def tick() -> None:
        done[0] += 1
        progress(done[0], total)

    return tick
