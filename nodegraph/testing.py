"""Test helpers that any test may use (torch-free): a recording run context, a prompt builder and a
free port. One copy each, instead of one per test file.

    g = PromptBuilder()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="mini.safetensors")
    pos = g.node("CLIPTextEncode", text="a cat", clip=ckpt.out(1))
    prompt = g.prompt  # ComfyUI's API format: {"1": {"class_type": ..., "inputs": {...}}, ...}
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nodegraph.env import Environment
from nodegraph.node import Interrupted, Preview


class RecordingContext:
    """A `RunContext` for calling a node directly: records progress and warnings, and can raise
    `Interrupted` once `interrupt_after` progress steps were reported."""

    def __init__(self, env: Environment, node_id: str = "1", interrupt_after: int | None = None) -> None:
        self.env = env
        self.node_id = node_id
        self.interrupt_after = interrupt_after
        self.steps: list[tuple[int, int, Preview | None]] = []
        self.warnings: list[tuple[str, Mapping[str, Any] | None]] = []
        self.shown: list[dict[str, Any]] = []  # interim UI outputs (`show`)

    def progress(self, value: int, total: int, preview: Preview | None = None) -> None:
        self.steps.append((value, total, preview))
        self.check_interrupt()

    def check_interrupt(self) -> None:
        if self.interrupt_after is not None and len(self.steps) >= self.interrupt_after:
            raise Interrupted("interrupted by the test")

    def warn(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        self.warnings.append((message, details))

    def show(self, ui: Mapping[str, Any]) -> None:
        self.shown.append(dict(ui))


@dataclass(frozen=True)
class NodeRef:
    """One node of a `PromptBuilder`; `out(i)` is the link to its i-th output."""

    node_id: str

    def out(self, index: int = 0) -> list[Any]:
        return [self.node_id, index]


@dataclass
class PromptBuilder:
    """Builds an API-format prompt node by node (after ComfyUI's test `GraphBuilder`)."""

    prompt: dict[str, dict[str, Any]] = field(default_factory=dict)

    def node(self, class_type: str, node_id: str | None = None, /, **inputs: Any) -> NodeRef:
        """Add a node; inputs are constants or `other.out(i)` links. Ids count up from "1" by default."""
        node_id = node_id or str(len(self.prompt) + 1)
        if node_id in self.prompt:
            raise ValueError(f"node id {node_id!r} is already in the prompt")
        self.prompt[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        return NodeRef(node_id)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
