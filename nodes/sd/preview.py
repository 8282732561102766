"""Latent previews while sampling: ComfyUI's Latent2RGB method (latent_preview.py), as JPEG bytes."""

from __future__ import annotations

import io

import torch
from PIL import Image

# SD1.5 latent channel -> RGB factors (comfy/latent_formats.py SD15.latent_rgb_factors)
SD15_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)
MAX_PREVIEW_SIZE = 512


def latent_to_rgb(x0: torch.Tensor) -> Image.Image:
    """First batch item of a model-space x0 [B,4,h,w] as an RGB image at latent resolution."""
    latent = x0[0].detach().float().cpu()  # [4, h, w]
    rgb = torch.einsum("chw,cr->hwr", latent, SD15_RGB_FACTORS)
    pixels = (((rgb + 1.0) / 2.0).clamp(0, 1) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)  # uint8 [h, w, 3] is RGB


def preview_jpeg(x0: torch.Tensor, quality: int = 95) -> bytes:
    """A JPEG preview of x0, contained in 512x512 like ComfyUI's default preview size."""
    image = latent_to_rgb(x0)
    if max(image.size) > MAX_PREVIEW_SIZE:
        image.thumbnail((MAX_PREVIEW_SIZE, MAX_PREVIEW_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
