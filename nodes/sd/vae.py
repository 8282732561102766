"""VAE decode and encode with ComfyUI's conventions (`comfy/sd.py` VAE.decode / VAE.encode).

Latents travel unscaled (the LATENT value is what the VAE's encoder gives; the sampler scales by
0.18215 itself). Images are float32 `[B, H, W, 3]` in [0, 1], as ComfyUI's IMAGE.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from nodes.sd.checkpoint import PixelSpaceVae
from nodes.sd.device import place, where

# VAEs whose half-precision decode gave NaN/inf once (SDXL's VAE overflows in fp16): decoded in fp32 since.
_UPCAST: weakref.WeakSet[Any] = weakref.WeakSet()


class VaeInputError(ValueError):
    """A latent or image of the wrong shape was given to the VAE."""


def decode(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    """Latent `[B, C, h, w]` -> image `[B, 8h, 8w, 3]`: post_quant_conv, decoder, clamp((x+1)/2, 0, 1)."""
    if latent.ndim == 5:  # video-style latents are flattened to an image batch, as ComfyUI does
        latent = latent.movedim(2, 1).reshape(-1, latent.shape[1], *latent.shape[3:])
    channels = vae.config.latent_channels
    if isinstance(vae, PixelSpaceVae) and latent.ndim == 4 and latent.shape[1] == 3:
        return torch.clamp((latent.float() + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1).contiguous()
    if latent.ndim != 4 or latent.shape[1] != channels:
        raise VaeInputError(
            f"the VAE needs a latent of shape [B, {channels}, h, w], got {list(latent.shape)}"
        )
    parts = []
    if vae in _UPCAST:
        place(vae, where(vae)[0], torch.float32)
    with torch.inference_mode():
        for z in latent.to(torch.float32).split(_batch_chunk(latent.shape[2] * latent.shape[3])):
            x = _decode_chunk(vae, z)
            if where(vae)[1] in (torch.float16, torch.bfloat16) and not torch.isfinite(x).all():
                # ComfyUI's fallback: a half-precision decode that overflowed is redone in fp32 (and the
                # VAE stays fp32 for later decodes), never returned as NaN pixels.
                _UPCAST.add(vae)
                place(vae, where(vae)[0], torch.float32)
                x = _decode_chunk(vae, z)
            parts.append(torch.clamp((x.cpu().float() + 1.0) / 2.0, min=0.0, max=1.0))
    return torch.cat(parts).movedim(1, -1).contiguous().clone()


def _decode_chunk(vae: Any, z: torch.Tensor) -> torch.Tensor:
    device, dtype = where(vae)
    z = z.to(device, dtype)
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    out: torch.Tensor = vae.decoder(z)
    return out


def _batch_chunk(latent_pixels: int) -> int:
    """Images per VAE pass: one 512x512 image at a time (about 2 GB of activations), more when small."""
    return max(1, (64 * 64) // max(latent_pixels, 1))


def crop_to_multiple(pixels: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Centre-crop `[B, H, W, C]` so H and W are multiples of `multiple` (offset `(dim % m) // 2`)."""
    height, width = pixels.shape[1], pixels.shape[2]
    h, w = (height // multiple) * multiple, (width // multiple) * multiple
    if (h, w) == (height, width):
        return pixels
    top, left = (height % multiple) // 2, (width % multiple) // 2
    return pixels[:, top : top + h, left : left + w, :]


def encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Image `[B, H, W, C]` -> latent `[B, 4, H/8, W/8]`: crop, x·2−1, encoder, quant_conv, posterior mean."""
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise VaeInputError(f"the VAE needs an image of shape [B, H, W, 3], got {list(pixels.shape)}")
    if isinstance(vae, PixelSpaceVae):
        return (pixels[:, :, :, :3].movedim(-1, 1).float() * 2.0 - 1.0).contiguous()
    pixels = crop_to_multiple(pixels[:, :, :, :3])
    if pixels.shape[1] < 8 or pixels.shape[2] < 8:
        raise VaeInputError(
            f"an image of {pixels.shape[2]}x{pixels.shape[1]} is too small to encode (8x8 at least)"
        )
    means = []
    device, dtype = where(vae)
    with torch.inference_mode():
        batch = pixels.movedim(-1, 1).to(torch.float32) * 2.0 - 1.0
        for x in batch.split(_batch_chunk(batch.shape[2] * batch.shape[3] // 64)):
            h = vae.encoder(x.to(device, dtype))
            if getattr(vae, "quant_conv", None) is not None:
                h = vae.quant_conv(h)
            means.append(torch.chunk(h, 2, dim=1)[0].cpu())
    return torch.cat(means).float().contiguous().clone()
