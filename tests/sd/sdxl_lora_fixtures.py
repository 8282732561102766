"""SDXL-shaped modules for the LoRA tests: small ones with real values, and the mini checkpoint's shapes.

Both are built from the oracle generator's own configs and name maps (`make_mini_sdxl.py`), so the
key maps under test are checked against an independent LDM -> diffusers map. The small models have
the mini UNet's structure (three levels, attention depths 0 / 1 / 2, SDXL's `add_embedding`) at a
fraction of the width, and two-layer CLIP-L and bigG encoders whose weights are fp16-rounded as the
checkpoint loader stores them; the full-size shapes are built on the meta device (names and shapes
only, no memory).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from tests.conftest import oracle_module

SMALL_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "channel_mult": [1, 1, 2],
    "num_res_blocks": 2,
    "transformer_depth": [0, 1, 2],
    "transformer_depth_middle": 2,
    "transformer_depth_output": [0, 1, 2],
    "num_head_channels": 16,
    "context_dim": 48,
    "adm_in_channels": 32 + 6 * 256,
    "time_embed_dim": 128,
    "ff_mult": 4,
}
SMALL_TE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def oracle_sdxl(oracle: Path) -> Any:
    """The oracle's `make_mini_sdxl` module (it imports `make_mini_sd15` beside it)."""
    return oracle_module("make_mini_sdxl", oracle)


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")
    }


def _build(
    oracle: Path, unet_cfg: dict[str, Any], te_l: dict[str, Any], te_g: dict[str, Any]
) -> tuple[Any, Any, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    x = oracle_sdxl(oracle)
    unet = UNet2DConditionModel(**_clean(x.diffusers_unet_config(unet_cfg)))
    clip_l = CLIPTextModel(CLIPTextConfig(**_clean(x.base.clip_text_config()) | te_l))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**_clean(x.clip_g_text_config()) | te_g))
    return unet, clip_l, clip_g


@functools.cache
def mini_shapes(oracle: Path) -> tuple[Any, Any, Any]:
    """(UNet, CLIP-L, bigG) with the mini SDXL checkpoint's module names and shapes, on the meta device."""
    with torch.device("meta"):
        return _build(oracle, oracle_sdxl(oracle).UNET_CFG, {}, {})


@functools.cache
def small_models(oracle: Path) -> tuple[Any, Any, Any]:
    """Small SDXL-structured (UNet fp32, CLIP-L, bigG with fp16-rounded weights), seeded."""
    torch.manual_seed(0)
    te_g = SMALL_TE | {"projection_dim": SMALL_TE["hidden_size"]}
    unet, clip_l, clip_g = _build(oracle, SMALL_UNET, SMALL_TE, te_g)
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-inits some layers: give every weight a value
            p.copy_(torch.randn(p.shape) * (p.shape[-1] if p.dim() > 1 else 1) ** -0.5 * 0.5)
        for te in (clip_l, clip_g):
            for p in te.parameters():
                p.copy_(p.half().float())
    return tuple(m.eval().requires_grad_(False) for m in (unet, clip_l, clip_g))  # type: ignore[return-value]


def small_ldm_names(oracle: Path) -> dict[str, str]:
    """diffusers module path -> LDM (SGM) module path of the small UNet, from the oracle's map."""
    ldm_to_dif = oracle_sdxl(oracle).unet_ldm_to_diffusers(SMALL_UNET)
    return {d.rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k, d in ldm_to_dif.items()}
