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
# SDXL's own factors and bias (comfy/latent_formats.py SDXL.latent_rgb_factors / _bias): its VAE's
# latent space is not SD1.5's, so SD1.5's factors give an SDXL preview the wrong colours.
SDXL_RGB_FACTORS = torch.tensor(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ]
)
SDXL_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])
# Playground v2.5's (comfy/latent_formats.py SDXL_Playground_2_5.latent_rgb_factors): no bias
PLAYGROUND_RGB_FACTORS = torch.tensor(
    [
        [0.3920, 0.4054, 0.4549],
        [-0.2634, -0.0196, 0.0653],
        [0.0568, 0.1687, -0.0755],
        [-0.3112, -0.2359, -0.2076],
    ]
)
MAX_PREVIEW_SIZE = 512


def latent_to_rgb(x0: torch.Tensor, sdxl: bool = False, playground: bool = False) -> Image.Image:
    """First batch item of a model-space x0 [B,4,h,w] as an RGB image at latent resolution
    (`sdxl`: an SDXL-family model's latent, with SDXL's factors; `playground`: a model in Playground
    v2.5's latent format, with its factors)."""
    latent = x0[0].detach().float().cpu()  # [4, h, w]
    factors = PLAYGROUND_RGB_FACTORS if playground else SDXL_RGB_FACTORS if sdxl else SD15_RGB_FACTORS
    rgb = torch.einsum("chw,cr->hwr", latent, factors)
    if sdxl and not playground:
        rgb = rgb + SDXL_RGB_BIAS
    pixels = (((rgb + 1.0) / 2.0).clamp(0, 1) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)  # uint8 [h, w, 3] is RGB


def preview_jpeg(x0: torch.Tensor, quality: int = 95, sdxl: bool = False, playground: bool = False) -> bytes:
    """A JPEG preview of x0, contained in 512x512 like ComfyUI's default preview size."""
    image = latent_to_rgb(x0, sdxl, playground)
    if max(image.size) > MAX_PREVIEW_SIZE:
        image.thumbnail((MAX_PREVIEW_SIZE, MAX_PREVIEW_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
