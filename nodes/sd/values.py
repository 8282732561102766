"""The values on LATENT and CONDITIONING links, as typed records of ComfyUI's containers.

A LATENT is ComfyUI's dict: `samples` [B, C, H, W] and, when set, `noise_mask` (inpainting) and
`batch_index` (LatentFromBatch). A CONDITIONING is a list of entries; an entry is ComfyUI's
`[embedding, options]` pair, here a 2-tuple whose options are a `CondOptions` record (the keys
ComfyUI's conditioning nodes set; every key optional, as in ComfyUI). `cond_entries` reads them
into the sampler's resolved `CondEntry`s.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

import torch


class Latent(TypedDict):
    """LATENT: the latent batch and what travels with it."""

    samples: torch.Tensor
    noise_mask: NotRequired[torch.Tensor]  # SetLatentNoiseMask / VAEEncodeForInpaint
    batch_index: NotRequired[list[int]]  # LatentFromBatch / RepeatLatentBatch: each sample's seed index


class CondOptions(TypedDict, total=False):
    """The options of one conditioning entry (comfy/samplers.py and the conditioning nodes)."""

    pooled_output: torch.Tensor | None
    strength: float
    area: tuple[Any, ...]  # (h, w, y, x) latent pixels, or ("percentage", h, w, y, x)
    set_area_to_bounds: bool
    mask: torch.Tensor
    mask_strength: float
    start_percent: float
    end_percent: float
    concat_latent_image: torch.Tensor  # InpaintModelConditioning
    concat_mask: torch.Tensor
    control: Any  # ControlNetApply's chain (nodes/sd/controlnet.py `Control`)
    control_apply_to_uncond: bool
    unclip_conditioning: list[dict[str, Any]]  # unCLIPConditioning (read by unCLIP models only)
    # GLIGENTextBoxApply: ("position", GLIGEN model, [(pooled text, h, w, y, x) in latent pixels, ...])
    gligen: tuple[str, Any, list[Any]]
    # SDXL's added conditioning (CLIPTextEncodeSDXL / Refiner)
    width: int
    height: int
    crop_w: int
    crop_h: int
    target_width: int
    target_height: int
    aesthetic_score: float


ConditioningEntry = tuple[torch.Tensor, CondOptions]
Conditioning = list[ConditioningEntry]
