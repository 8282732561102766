"""Fixtures for the SD machinery tests: the oracle's mini checkpoint, loaded once per session, and a
tiny random UNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodes.sd.checkpoint import LoadedCheckpoint, load_checkpoint


@pytest.fixture(scope="session")
def loaded_mini(mini_checkpoint: Path) -> LoadedCheckpoint:
    """The oracle's mini SD1.5 checkpoint, loaded by `nodes.sd.checkpoint` (shared: never modify it)."""
    return load_checkpoint(mini_checkpoint)


@pytest.fixture(scope="module")
def unet() -> Any:
    """A tiny random diffusers UNet shaped like the mini SD1.5 one (two levels, attention at level 0
    and in the middle; context width 16), seeded; one per module. test_guidance_area.py has its own
    (the mini checkpoint's)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model: Any = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    model.train(False)
    return model
