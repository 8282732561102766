"""A tiny random diffusers UNet shaped like the mini SD1.5 one: two levels (32/64 channels),
attention at level 0 and in the middle, context width 16. `tests/sd/conftest.py` serves it as the
`unet` fixture; tests that change its weights build their own with `tiny_unet()`."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

WIDTH = 16  # the context (cross-attention) width


def tiny_unet() -> Any:
    """The UNet, seeded (torch.manual_seed(0)), in eval mode."""
    torch.manual_seed(0)
    model: Any = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return model.eval()
