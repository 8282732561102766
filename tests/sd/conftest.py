"""Fixtures for the SD machinery tests: the oracle's mini checkpoint, loaded once per session, and a
tiny random UNet (tests/sd/tiny_unet.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodes.sd.checkpoint import LoadedCheckpoint, load_checkpoint


@pytest.fixture(scope="session")
def loaded_mini(mini_checkpoint: Path) -> LoadedCheckpoint:
    """The oracle's mini SD1.5 checkpoint, loaded by `nodes.sd.checkpoint` (shared: never modify it)."""
    return load_checkpoint(mini_checkpoint)


@pytest.fixture(scope="module")
def unet() -> Any:
    """tests/sd/tiny_unet.py's UNet, one per module (shared by its tests: never change its weights).
    test_guidance_area.py has its own (the mini checkpoint's)."""
    from tests.sd.tiny_unet import tiny_unet

    return tiny_unet()
