"""Mask and inpaint nodes: SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning,
LoadImageMask (ComfyUI nodes.py).

A MASK is float32 `[B, H, W]` (or `[H, W]`), 1 where the image is to be repainted. KSampler
honours a latent's "noise_mask" and, for an inpainting checkpoint (9-channel UNet), the
conditioning's "concat_latent_image" / "concat_mask" (nodes/sd/ksampler.py), so these nodes only
build them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import ImageOps

from nodegraph.file_inputs import annotated_path
from nodegraph.images import open_checked
from nodegraph.node import Boolean, Combo, ImageUpload, Int, Node, Output, RunContext, Socket
from nodegraph.types import CONDITIONING, IMAGE, LATENT, MASK, VAE
from nodes.conditioning_area import set_values
from nodes.image import reading_image
from nodes.sd import vae as vae_math
from nodes.sd.device import on_device
from nodes.sd.handles import VaeHandle
from nodes.sd.values import Conditioning, CondOptions, Latent

DOWNSCALE = 8  # SD1.5 VAE: one latent pixel per 8x8 image pixels


class SetLatentNoiseMask(Node):
    """Only the masked part of the latent is sampled; the rest is kept."""

    DISPLAY_NAME = "Set Latent Noise Mask"
    CATEGORY = "latent/inpaint"
    INPUTS = (Socket("samples", LATENT), Socket("mask", MASK))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, mask: torch.Tensor) -> tuple[Latent]:
        out = samples.copy()
        out["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (out,)


def inpaint_pixels(
    pixels: torch.Tensor, mask: torch.Tensor, grow_mask_by: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels to encode, noise mask) as VAEEncodeForInpaint prepares them.

    Pixels are centre-cropped to multiples of 8, the mask is resized bilinear to the pixel size,
    masked pixels (mask rounded) become 0.5 grey, and the noise mask is the rounded mask grown by a
    `grow_mask_by` square kernel.
    """
    h = (pixels.shape[1] // DOWNSCALE) * DOWNSCALE
    w = (pixels.shape[2] // DOWNSCALE) * DOWNSCALE
    mask = torch.nn.functional.interpolate(
        mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
        size=(pixels.shape[1], pixels.shape[2]),
        mode="bilinear",
    )
    pixels = pixels.clone()
    if pixels.shape[1] != h or pixels.shape[2] != w:
        y0 = (pixels.shape[1] % DOWNSCALE) // 2
        x0 = (pixels.shape[2] % DOWNSCALE) // 2
        pixels = pixels[:, y0 : h + y0, x0 : w + x0, :]
        mask = mask[:, :, y0 : h + y0, x0 : w + x0]
    if grow_mask_by == 0:
        grown = mask
    else:
        kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        padding = math.ceil((grow_mask_by - 1) / 2)
        grown = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel, padding=padding), 0, 1)
    keep = (1.0 - mask.round()).squeeze(1)
    for i in range(3):
        pixels[:, :, :, i] -= 0.5
        pixels[:, :, :, i] *= keep
        pixels[:, :, :, i] += 0.5
    return pixels, grown[:, :, :h, :w].round()


class VAEEncodeForInpaint(Node):
    """Encode an image for inpainting: the masked area is greyed out and becomes the latent's noise mask."""

    DISPLAY_NAME = "VAE Encode (for Inpainting)"
    CATEGORY = "latent/inpaint"
    INPUTS = (
        Socket("pixels", IMAGE),
        Socket("vae", VAE),
        Socket("mask", MASK),
        Int("grow_mask_by", 6, min=0, max=64, step=1),
    )
    OUTPUTS = (Output(LATENT),)

    def run(
        self, ctx: RunContext, pixels: torch.Tensor, vae: VaeHandle, mask: torch.Tensor, grow_mask_by: int
    ) -> tuple[Latent]:
        prepared, noise_mask = inpaint_pixels(pixels, mask, grow_mask_by)
        return (
            {
                "samples": vae_math.encode(on_device(ctx.env, vae.vae, "vae"), prepared),
                "noise_mask": noise_mask,
            },
        )


def grey_masked(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InpaintModelConditioning's pixel step: (masked pixels cropped to multiples of 8, mask [B,1,H,W]).

    The mask is resized bilinear to the pixel size; pixels and mask are centre-cropped to multiples
    of 8; pixels under the rounded mask become 0.5 grey: (p - 0.5) * (1 - round(mask)) + 0.5.
    """
    if pixels.ndim != 4 or mask.ndim not in (2, 3, 4) or mask.numel() == 0:
        raise ValueError(
            f"InpaintModelConditioning: expected pixels [B, H, W, C] and a MASK [B, H, W], got "
            f"{list(pixels.shape)} and {list(mask.shape)}; connect a LoadImage IMAGE and a MASK"
        )
    masks = mask.reshape((-1, mask.shape[-2], mask.shape[-1])).shape[0]
    if masks not in (1, pixels.shape[0]):
        raise ValueError(
            f"InpaintModelConditioning: mask: {masks} masks for {pixels.shape[0]} images; "
            "give one mask, or one per image"
        )
    mask = torch.nn.functional.interpolate(
        mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
        size=(pixels.shape[1], pixels.shape[2]),
        mode="bilinear",
    )
    h = (pixels.shape[1] // DOWNSCALE) * DOWNSCALE
    w = (pixels.shape[2] // DOWNSCALE) * DOWNSCALE
    y0 = (pixels.shape[1] % DOWNSCALE) // 2
    x0 = (pixels.shape[2] % DOWNSCALE) // 2
    pixels = pixels[:, y0 : y0 + h, x0 : x0 + w, :].clone()
    mask = mask[:, :, y0 : y0 + h, x0 : x0 + w]
    keep = (1.0 - mask.round()).squeeze(1).unsqueeze(-1)
    pixels[:, :, :, :3] = (pixels[:, :, :, :3] - 0.5) * keep + 0.5
    return pixels, mask


class InpaintModelConditioning(Node):
    """Prepare prompts and latent for an inpainting model: the masked image and mask go with each prompt."""

    CATEGORY = "conditioning/inpaint"
    INPUTS = (
        Socket("positive", CONDITIONING),
        Socket("negative", CONDITIONING),
        Socket("vae", VAE),
        Socket("pixels", IMAGE),
        Socket("mask", MASK),
        Boolean(
            "noise_mask",
            True,
            tooltip="Add a noise mask to the latent so sampling will only happen within the mask. "
            "Might improve results or completely break things depending on the model.",
        ),
    )
    # noise_mask touches the latent only; each prompt is its own conditioning plus the masked image
    OUTPUTS = (
        Output(CONDITIONING, "positive", depends_on=("positive", "vae", "pixels", "mask")),
        Output(CONDITIONING, "negative", depends_on=("negative", "vae", "pixels", "mask")),
        Output(LATENT, "latent", depends_on=("vae", "pixels", "mask", "noise_mask")),
    )

    def run(
        self,
        ctx: RunContext,
        positive: Conditioning,
        negative: Conditioning,
        vae: VaeHandle,
        pixels: torch.Tensor,
        mask: torch.Tensor,
        noise_mask: bool,
    ) -> tuple[Conditioning, Conditioning, Latent]:
        masked, mask = grey_masked(pixels, mask)
        model = on_device(ctx.env, vae.vae, "vae")
        concat_latent = vae_math.encode(model, masked)
        orig_latent = vae_math.encode(model, pixels)
        latent: Latent = {"samples": orig_latent}
        if noise_mask:
            latent["noise_mask"] = mask
        values: CondOptions = {"concat_latent_image": concat_latent, "concat_mask": mask}
        return (set_values(positive, values), set_values(negative, values), latent)


MASK_CHANNELS = ("alpha", "red", "green", "blue")


def load_mask_file(path: Any, name: str, channel: str) -> torch.Tensor:
    """`[1, H, W]` from one channel of the image (alpha inverted); zeros `[1, 64, 64]` if it lacks it."""
    band = channel[0].upper()
    with reading_image(name):
        img = open_checked(path, name, frames=False)
        img = ImageOps.exif_transpose(img) or img
        if img.getbands() != ("R", "G", "B", "A"):
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGBA")
        if band not in img.getbands():
            return torch.zeros((1, 64, 64), dtype=torch.float32)
        values = np.array(img.getchannel(band)).astype(np.float32) / 255.0
    mask = torch.from_numpy(values)
    if band == "A":
        mask = 1.0 - mask
    return mask.unsqueeze(0)


class LoadImageMask(Node):
    """Load one channel of an image from the input folder as a mask (alpha is inverted)."""

    DISPLAY_NAME = "Load Image (as Mask)"
    CATEGORY = "mask"
    INPUTS = (
        ImageUpload("image"),
        Combo("channel", choices=MASK_CHANNELS),
    )
    OUTPUTS = (Output(MASK),)

    def run(self, ctx: RunContext, image: str, channel: str) -> tuple[torch.Tensor]:
        return (load_mask_file(annotated_path(ctx.env, image), image, channel),)


NODES: tuple[type[Node], ...] = (
    SetLatentNoiseMask,
    VAEEncodeForInpaint,
    InpaintModelConditioning,
    LoadImageMask,
)
