"""Fixtures for the SD machinery tests: the oracle's mini checkpoint, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes.sd.checkpoint import LoadedCheckpoint, load_checkpoint


@pytest.fixture(scope="session")
def loaded_mini(mini_checkpoint: Path) -> LoadedCheckpoint:
    """The oracle's mini SD1.5 checkpoint, loaded by `nodes.sd.checkpoint` (shared: never modify it)."""
    return load_checkpoint(mini_checkpoint)
