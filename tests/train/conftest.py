"""Fixtures for the training tests: the mini SD1.5 checkpoint's modules, and one torch thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nodes.sd.checkpoint import LoadedCheckpoint, load_checkpoint


@pytest.fixture(scope="module")
def models(mini_checkpoint: Path) -> LoadedCheckpoint:
    """The mini checkpoint loaded for this module alone (training attaches adapters to its modules)."""
    return load_checkpoint(mini_checkpoint)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread while a module runs (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    these tensors are tiny, and on a shared 2-core machine torch's second thread mostly spins waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
