"""Latent transform nodes: LatentUpscaleBy, LatentComposite, LatentBlend, LatentCrop, LatentRotate,
LatentFlip (ComfyUI nodes.py: ids, inputs and arithmetic).

Every node returns a new dict (a shallow copy keeping "noise_mask" and "batch_index" unless the node
changes them) and never modifies the tensors it was given.
"""

from __future__ import annotations

import torch

from nodegraph.node import MAX_RESOLUTION, Combo, Float, Int, Node, Output, RunContext, Socket
from nodegraph.types import LATENT
from nodes.sd.latent_ops import UPSCALE_METHODS, common_upscale
from nodes.sd.values import Latent


class LatentUpscaleBy(Node):
    """Resize a latent image by a factor (each side rounded to whole latent pixels)."""

    DISPLAY_NAME = "Upscale Latent By"
    CATEGORY = "latent"
    INPUTS = (
        Socket("samples", LATENT),
        Combo("upscale_method", choices=UPSCALE_METHODS),
        Float("scale_by", 1.5, min=0.01, max=8.0, step=0.01),
    )
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, upscale_method: str, scale_by: float) -> tuple[Latent]:
        t: torch.Tensor = samples["samples"]
        width, height = round(t.shape[-1] * scale_by), round(t.shape[-2] * scale_by)
        out = samples.copy()
        out["samples"] = common_upscale(t, width, height, upscale_method, "disabled")
        return (out,)


class LatentComposite(Node):
    """Paste `samples_from` into `samples_to` at (x, y) pixels, optionally feathering the inner edges."""

    DISPLAY_NAME = "Latent Composite"
    CATEGORY = "latent"
    INPUTS = (
        Socket("samples_to", LATENT),
        Socket("samples_from", LATENT),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("feather", 0, min=0, max=MAX_RESOLUTION, step=8),
    )
    OUTPUTS = (Output(LATENT),)

    def run(
        self, ctx: RunContext, samples_to: Latent, samples_from: Latent, x: int, y: int, feather: int
    ) -> tuple[Latent]:
        x, y, feather = x // 8, y // 8, feather // 8
        out = samples_to.copy()
        to: torch.Tensor = samples_to["samples"]
        s = to.clone()
        src: torch.Tensor = samples_from["samples"][:, :, : to.shape[2] - y, : to.shape[3] - x]
        h, w = src.shape[2], src.shape[3]
        if feather == 0:
            s[:, :, y : y + h, x : x + w] = src
        else:
            mask = torch.ones_like(src)
            for t in range(feather):
                ramp = (1.0 / feather) * (t + 1)
                if y != 0:
                    mask[:, :, t : 1 + t, :] *= ramp
                if y + h < to.shape[2]:
                    mask[:, :, h - 1 - t : h - t, :] *= ramp
                if x != 0:
                    mask[:, :, :, t : 1 + t] *= ramp
                if x + w < to.shape[3]:
                    mask[:, :, :, w - 1 - t : w - t] *= ramp
            region = s[:, :, y : y + h, x : x + w]
            s[:, :, y : y + h, x : x + w] = src * mask + region * (torch.ones_like(mask) - mask)
        out["samples"] = s
        return (out,)


class LatentBlend(Node):
    """Blend two latents: samples1·blend_factor + samples2·(1 − blend_factor)."""

    DISPLAY_NAME = "Latent Blend"
    CATEGORY = "_for_testing"
    INPUTS = (
        Socket("samples1", LATENT),
        Socket("samples2", LATENT),
        Float("blend_factor", 0.5, min=0, max=1, step=0.01),
    )
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples1: Latent, samples2: Latent, blend_factor: float) -> tuple[Latent]:
        out = samples1.copy()
        a: torch.Tensor = samples1["samples"]
        b: torch.Tensor = samples2["samples"]
        if a.shape != b.shape:
            b = common_upscale(b, a.shape[3], a.shape[2], "bicubic", "center")
        out["samples"] = a * blend_factor + b * (1 - blend_factor)
        return (out,)


class LatentCrop(Node):
    """Crop a latent to width × height pixels at (x, y); the origin stays at least 64 pixels from the edge."""

    DISPLAY_NAME = "Crop Latent"
    CATEGORY = "latent/transform"
    INPUTS = (
        Socket("samples", LATENT),
        Int("width", 512, min=64, max=MAX_RESOLUTION, step=8),
        Int("height", 512, min=64, max=MAX_RESOLUTION, step=8),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=8),
    )
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, width: int, height: int, x: int, y: int) -> tuple[Latent]:
        out = samples.copy()
        t: torch.Tensor = samples["samples"]
        x, y = min(x // 8, t.shape[3] - 8), min(y // 8, t.shape[2] - 8)
        out["samples"] = t[:, :, y : y + height // 8, x : x + width // 8]
        return (out,)


class LatentRotate(Node):
    """Rotate a latent clockwise by 90, 180 or 270 degrees."""

    DISPLAY_NAME = "Rotate Latent"
    CATEGORY = "latent/transform"
    INPUTS = (
        Socket("samples", LATENT),
        Combo("rotation", choices=("none", "90 degrees", "180 degrees", "270 degrees")),
    )
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, rotation: str) -> tuple[Latent]:
        turns = {"90": 1, "180": 2, "270": 3}.get(rotation.split(" ")[0], 0)
        out = samples.copy()
        out["samples"] = torch.rot90(samples["samples"], k=turns, dims=[3, 2])
        return (out,)


class LatentFlip(Node):
    """Flip a latent vertically (x-axis) or horizontally (y-axis)."""

    DISPLAY_NAME = "Flip Latent"
    CATEGORY = "latent/transform"
    INPUTS = (
        Socket("samples", LATENT),
        Combo("flip_method", choices=("x-axis: vertically", "y-axis: horizontally")),
    )
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, flip_method: str) -> tuple[Latent]:
        out = samples.copy()
        dim = 2 if flip_method.startswith("x") else 3
        out["samples"] = torch.flip(samples["samples"], dims=[dim])
        return (out,)


NODES: tuple[type[Node], ...] = (
    LatentUpscaleBy,
    LatentComposite,
    LatentBlend,
    LatentCrop,
    LatentRotate,
    LatentFlip,
)
