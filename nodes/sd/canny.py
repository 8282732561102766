"""Canny edges as ComfyUI's core Canny node computes them (comfy_extras/nodes_canny.py calls
`kornia.filters.canny` with its defaults), written here without kornia.

The steps and their arithmetic follow kornia's (0.8): grey = 0.299 R + 0.587 G + 0.114 B; a 5x5
Gaussian blur (sigma 1, normalised fp32 kernel, applied as a 1x5 then a 5x1 correlation over
reflect-padded borders); Sobel gradients (unnormalised 3x3 kernels, replicate padding); magnitude
sqrt(gx² + gy² + 1e-6) and the gradient direction rounded to a multiple of 45°; non-maximum
suppression against both neighbours along that direction (zero outside the image); thresholds
(strictly above: low gives 0.5, high 1); then hysteresis: weak pixels next to a strong one (of the
8 neighbours) become strong until nothing changes, and the remaining weak ones are dropped.
Every comparison and difference is exact, so the edges equal kornia's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6
# (dy, dx) of the neighbour for each of the 8 directions, in kornia's channel order (0 = +x, then
# turning towards +y): the direction index is round(angle / 45°) mod 8.
NEIGHBOURS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _gaussian_5(dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(5, dtype=dtype) - 2.0
    gauss = torch.exp(-x.pow(2.0) / (2 * torch.tensor(1.0, dtype=dtype).pow(2.0)))
    return gauss / gauss.sum(-1, keepdim=True)


def _blur(grey: torch.Tensor) -> torch.Tensor:
    kernel = _gaussian_5(grey.dtype)
    out = F.conv2d(F.pad(grey, [2, 2, 0, 0], mode="reflect"), kernel.reshape(1, 1, 1, 5))
    return F.conv2d(F.pad(out, [0, 0, 2, 2], mode="reflect"), kernel.reshape(1, 1, 5, 1))


def _sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=image.dtype)
    kernel = torch.stack([kx, kx.transpose(0, 1)])[:, None]
    out = F.conv2d(F.pad(image, [1, 1, 1, 1], mode="replicate"), kernel)
    return out[:, 0:1], out[:, 1:2]


def _neighbour(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """t at (y + dy, x + dx), zero outside."""
    h, w = t.shape[-2:]
    padded = F.pad(t, [1, 1, 1, 1])
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def canny_edges(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Edges [B,1,H,W] (0 or 1) of an image [B,C,H,W] in [0,1] (C 3 is made grey, C 1 used as is)."""
    if low > high:
        raise ValueError(f"low_threshold {low} is above high_threshold {high}; make it lower")
    if image.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)
        w_r, w_g, w_b = weights.unbind()
        image = w_r * image[:, 0:1] + w_g * image[:, 1:2] + w_b * image[:, 2:3]
    gx, gy = _sobel(_blur(image))
    magnitude = torch.sqrt(gx * gx + gy * gy + EPS)
    direction = (torch.atan2(gy, gx) * (4 / math.pi)).round()
    along = torch.stack([magnitude - _neighbour(magnitude, dy, dx) for dy, dx in NEIGHBOURS], 1)[:, :, 0]
    forward = torch.gather(along, 1, (direction % 8).long())
    backward = torch.gather(along, 1, ((direction + 4) % 8).long())
    magnitude = magnitude * (torch.minimum(forward, backward) > 0.0)
    edges = (magnitude > low) * 0.5 + (magnitude > high) * 0.5
    edges = edges.to(image.dtype)
    while True:
        weak, strong = (edges == 0.5).to(image.dtype), (edges == 1).to(image.dtype)
        near_strong = torch.zeros_like(edges, dtype=torch.bool)
        for dy, dx in NEIGHBOURS:
            near_strong |= _neighbour(edges, dy, dx) == 1
        kept = near_strong.to(image.dtype) * weak + strong
        grown = kept + (kept == 0) * weak * 0.5
        if torch.equal(grown, edges):
            return kept
        edges = grown
