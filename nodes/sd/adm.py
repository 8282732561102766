"""SDXL's added conditioning (the `y` vector), as ComfyUI's `model_base.SDXL.encode_adm` builds it.

Base: `y = cat([pooled, E(height), E(width), E(crop_h), E(crop_w), E(target_height), E(target_width)])`
(1280 + 6·256 = 2816). Refiner: `cat([pooled, E(height), E(width), E(crop_h), E(crop_w), E(ascore)])`
(2560), aesthetic score 6 for the positive side and 2.5 for the negative unless the entry sets one.
`E(v) = cat([cos(v·f), sin(v·f)])`, `f_k = exp(−ln(10000)·k/128)`, in fp32.

Sizes come from the entry's options (CLIPTextEncodeSDXL / ...Refiner); otherwise, as ComfyUI's
`encode_model_conds`, width and height are the latent's size × 8, crop 0 and target = size.
The UNet (diffusers, `addition_embed_type "text_time"`) receives the pooled output as `text_embeds`
and the size values as `time_ids` and computes the same sinusoids itself (`flip_sin_to_cos=True`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nodes.sd.convert import SIZE_EMBED_DIM
from nodes.sd.convert_sdxl import BASE_ADM, REFINER_ADM

Added = tuple[torch.Tensor, torch.Tensor]  # (text_embeds [1, 1280], time_ids [1, 5 or 6])


class AdmError(ValueError):
    """A conditioning entry an SDXL UNet cannot use."""


def adm_width(unet: Any) -> int | None:
    """The width of the UNet's added conditioning, or None for a UNet without one (SD1.x)."""
    config: Any = getattr(unet, "config", None)
    if getattr(config, "addition_embed_type", None) != "text_time":
        return None
    return int(config.projection_class_embeddings_input_dim)


def adm_inputs(options: dict[str, Any], width: int, height: int, side: str, adm: int, what: str) -> Added:
    """(pooled, size values) of one entry for a latent of `width` × `height` latent pixels."""
    pooled = options.get("pooled_output")
    if not isinstance(pooled, torch.Tensor):
        raise AdmError(
            f"{what}: this SDXL model needs the conditioning's pooled output and it has none; encode the "
            "prompt with the CLIP of an SDXL checkpoint"
        )
    w = _value(options, "width", width * 8, what)
    h = _value(options, "height", height * 8, what)
    values = [h, w, _value(options, "crop_h", 0, what), _value(options, "crop_w", 0, what)]
    if adm == REFINER_ADM:
        default_score = 2.5 if side == "negative" else 6.0
        values.append(_value(options, "aesthetic_score", default_score, what))
    elif adm == BASE_ADM:
        values += [_value(options, "target_height", h, what), _value(options, "target_width", w, what)]
    else:
        raise AdmError(f"{what}: a UNet with {adm} added-conditioning channels is not an SDXL UNet")
    pooled = pooled.float().reshape(pooled.shape[0], -1)
    expected = adm - SIZE_EMBED_DIM * len(values)
    if pooled.shape[-1] != expected:
        raise AdmError(
            f"{what}: pooled output of width {pooled.shape[-1]} does not fit this model (it expects "
            f"{expected}); encode the prompt with the CLIP of the same checkpoint"
        )
    return pooled, torch.tensor([values], dtype=torch.float32)


def _value(options: dict[str, Any], key: str, default: float, what: str) -> float:
    value = options.get(key, default)
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise AdmError(f"{what}: conditioning option {key!r} must be a number, got {value!r}") from None


def size_embedding(values: torch.Tensor) -> torch.Tensor:
    """ComfyUI's `Timestep(256)` of each value, flattened: `[B, 256·k]` (cos first)."""
    half = SIZE_EMBED_DIM // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = values.reshape(-1)[:, None].float() * freqs[None]
    embedded = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return embedded.reshape(values.shape[0], -1)


def encode_adm(added: Added) -> torch.Tensor:
    """The `y` vector `[B, adm]` ComfyUI computes for an entry (what the UNet's label embedding sees)."""
    pooled, time_ids = added
    return torch.cat([pooled.float(), size_embedding(time_ids)], dim=1)
