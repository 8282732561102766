"""Engine test fixtures: every test starts with the stub nodes' class-level records empty."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engine_stubs import reset_stub_state


@pytest.fixture(autouse=True)
def fresh_stubs() -> Iterator[None]:
    reset_stub_state()
    yield
    reset_stub_state()
