"""Fixtures for node tests: environments (empty, or whose models folder holds the oracle's mini
checkpoint), a recording run context, and the tiny random UNet of the sampling tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.sd.handles import ModelHandle


@pytest.fixture(scope="session")
def models_env(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Environment:
    """One environment for the session (its model store keeps the mini checkpoint loaded)."""
    base = tmp_path_factory.mktemp("nodegraph")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    (base / "models" / "embeddings").mkdir()
    return Environment(Folders.at(base))


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    """A fresh, empty environment (output, input and temp folders under tmp_path)."""
    for sub in ("input", "output", "temp"):
        (tmp_path / sub).mkdir()
    return Environment(Folders.at(tmp_path))


@pytest.fixture
def ctx(env: Environment) -> RecordingContext:
    return RecordingContext(env)


@pytest.fixture(scope="module")
def model() -> ModelHandle:
    """The tiny random UNet of `tests/nodes/tiny_unet.py` (2 levels, 32/64 channels), one per module."""
    from tests.nodes.tiny_unet import tiny_model

    return tiny_model()
