"""Server test fixtures: an engine over the stub nodes of `stubs.py`, its folders in a temp directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.server.stubs import RUNS, make_engine


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    RUNS.clear()
    return make_engine(tmp_path)
