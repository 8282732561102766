"""The one catalogue of execution events. The server turns them into ComfyUI websocket messages,
the CLI into a progress bar; the executor knows neither."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nodegraph.node import Preview


@dataclass(frozen=True)
class Event:
    prompt_id: str


@dataclass(frozen=True)
class ExecutionStart(Event):
    pass


@dataclass(frozen=True)
class ExecutionCached(Event):
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Executing(Event):
    node: str
    class_type: str


@dataclass(frozen=True)
class Progress(Event):
    node: str
    value: int
    max: int
    preview: Preview | None = None


@dataclass(frozen=True)
class Executed(Event):
    node: str
    output: Mapping[str, Any] | None  # None: a cached node that shows nothing (ComfyUI sends null)
    interim: bool = False  # sent while the node still runs (a training run's loss plot and samples)


@dataclass(frozen=True)
class NodeWarning(Event):
    node: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecutionSuccess(Event):
    pass


@dataclass(frozen=True)
class ExecutionError(Event):
    node_id: str
    node_type: str
    exception_type: str
    message: str
    traceback: tuple[str, ...] = ()
    executed: tuple[str, ...] = ()
    current_inputs: Mapping[str, Any] = field(default_factory=dict)
    current_outputs: tuple[str, ...] = ()  # nodes whose outputs were available (cached or run) at the failure


@dataclass(frozen=True)
class ExecutionInterrupted(Event):
    node_id: str | None
    node_type: str | None
    executed: tuple[str, ...] = ()


Emit = Callable[[Event], None]
