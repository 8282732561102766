"""A RunContext stand-in for calling nodes directly in tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodegraph.env import Environment


class FakeContext:
    """A RunContext that records warnings instead of sending them."""

    def __init__(self, env: Environment, node_id: str = "1") -> None:
        self.env = env
        self.node_id = node_id
        self.warnings: list[tuple[str, Mapping[str, Any] | None]] = []

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        pass

    def check_interrupt(self) -> None:
        pass

    def warn(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        self.warnings.append((message, details))
