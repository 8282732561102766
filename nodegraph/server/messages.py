"""Execution events → ComfyUI websocket messages (comfyui.md §4.2), one prompt at a time.

`PromptMessages` is fed every event of one prompt by the worker thread. It returns the messages
to send, remembers the ones ComfyUI keeps in the history's `status.messages`, and tracks each
node's progress for the `progress_state` message.

The sequence is ComfyUI's (execution.py `execute`, comfy_execution/progress.py `WebUIProgressHandler`,
main.py `hijack_progress`): `execution_start`, `execution_cached`; for a node that runs,
`progress_state` (started), `executing`, per step `progress_state` + `progress` (a preview goes
before `progress` to a socket with the metadata flag, after it to one without), `executed` when it
has UI output, `progress_state` (finished); for a cached output node (and a node that finds its
output made earlier in the same prompt) `executed`, with output null when it shows nothing, and
`progress_state`; then `execution_success`. A node the executor announces and then finds an
interrupt pending for gets `progress_state` and `executing`, then `execution_interrupted` naming it.
The executor reports no "node finished" event, so a node's finishing `progress_state` goes out
with what comes next (its `executed`, the next node's start, or the end), which keeps the order
ComfyUI's clients see.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from nodegraph import events as ev
from nodegraph.node import Preview

PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
_FORMATS = {"image/jpeg": 1, "image/png": 2}
WARNING_TYPE = "nodegraph.warning"


@dataclass(frozen=True)
class Message:
    """One websocket message. `broadcast` says what ComfyUI does when the prompt has no client:
    send it to every socket (True) or to nobody (False)."""

    type: str
    data: Any
    broadcast: bool = False
    seq: int = 0  # status messages only: newer ones replace older unsent ones


@dataclass(frozen=True)
class PreviewFrame:
    """A binary preview for the prompt's client: type 4 (`with_metadata`) for a socket that said it
    `supports_preview_metadata`, type 1 for one that did not (and for every socket when the prompt
    has no client: ComfyUI's feature check fails without one)."""

    preview: Preview
    metadata: dict[str, Any]
    with_metadata: bool
    broadcast: bool = True


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_preview(frame: PreviewFrame) -> bytes:
    """Binary frame: BE uint32 event type, then format (type 1) or metadata JSON (type 4), then image."""
    if frame.with_metadata:
        meta = json.dumps(frame.metadata).encode("utf-8")
        return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + frame.preview.data
    fmt = _FORMATS.get(frame.preview.image_type, 1)
    return struct.pack(">II", PREVIEW_IMAGE, fmt) + frame.preview.data


@dataclass
class PromptMessages:
    """Translate one prompt's events; collect history messages, outputs and node states."""

    prompt_id: str
    history: list[list[Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    node_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    current_node: str | None = None
    unfinished: str | None = None  # the node that ran and whose finishing progress_state is not sent
    total: int = 0  # the prompt's node count, for the v2 job's progress
    cached: frozenset[str] = frozenset()

    def nodes_done(self) -> int:
        """Nodes finished so far: the cached ones and those that ran to the end."""
        ran = {n for n, s in self.node_states.items() if s.get("state") == "finished"}
        return len(self.cached | ran)

    def translate(self, event: ev.Event) -> list[Message | PreviewFrame]:
        """The messages for one event, in sending order."""
        pid = self.prompt_id
        if isinstance(event, ev.ExecutionStart):
            return [self._kept("execution_start", {"prompt_id": pid, "timestamp": now_ms()})]
        if isinstance(event, ev.ExecutionCached):
            self.cached = frozenset(event.nodes)
            data = {"nodes": list(event.nodes), "prompt_id": pid, "timestamp": now_ms()}
            return [self._kept("execution_cached", data)]
        if isinstance(event, ev.Executing):
            return self._executing(event)
        if isinstance(event, ev.Progress):
            return self._progress(event)
        if isinstance(event, ev.Executed):
            output = dict(event.output) if event.output is not None else None
            if output is not None:
                self.outputs[event.node] = output  # an interim one is kept if the node fails
            data = {"node": event.node, "display_node": event.node, "output": output, "prompt_id": pid}
            if event.interim:  # still running (a training run's plots): no state change
                return [Message("executed", data)]
            if event.node != self.unfinished:  # a cached output node: shown again, finished at once
                sent = self._finished()  # (the node before it, when one ran: it finished first)
                self.node_states[event.node] = self._state(event.node, 1, 1, "finished")
                return [*sent, Message("executed", data), self._progress_state()]
            return [Message("executed", data), *self._finished()]
        if isinstance(event, ev.NodeWarning):
            data = {
                "prompt_id": pid,
                "node": event.node,
                "message": event.message,
                "details": dict(event.details),
            }
            return [self._kept(WARNING_TYPE, data)]
        if isinstance(event, ev.ExecutionSuccess):
            return [
                *self._finished(),
                self._kept("execution_success", {"prompt_id": pid, "timestamp": now_ms()}),
            ]
        if isinstance(event, ev.ExecutionError):
            finished = self._finished(unless=event.node_id)
            return [*finished, self._kept("execution_error", error_payload(event))]
        if isinstance(event, ev.ExecutionInterrupted):
            finished = self._finished(unless=event.node_id)
            data = {
                "prompt_id": pid,
                "node_id": event.node_id,
                "node_type": event.node_type,
                "executed": list(event.executed),
                "timestamp": now_ms(),
            }
            return [*finished, self._kept("execution_interrupted", data, broadcast=True)]
        return []

    def done(self) -> Message:
        """ComfyUI's legacy "prompt finished" signal."""
        return Message("executing", {"node": None, "prompt_id": self.prompt_id})

    def _kept(self, kind: str, data: dict[str, Any], broadcast: bool = False) -> Message:
        self.history.append([kind, data])
        return Message(kind, data, broadcast)

    def _executing(self, event: ev.Executing) -> list[Message | PreviewFrame]:
        sent: list[Message | PreviewFrame] = [*self._finished()]
        self.current_node = self.unfinished = event.node
        self.node_states[event.node] = self._state(event.node, 0, 1, "running")
        data = {"node": event.node, "display_node": event.node, "prompt_id": self.prompt_id}
        return [*sent, self._progress_state(), Message("executing", data)]

    def _progress(self, event: ev.Progress) -> list[Message | PreviewFrame]:
        self.node_states[event.node] = self._state(event.node, event.value, event.max, "running")
        data = {"value": event.value, "max": event.max, "prompt_id": self.prompt_id, "node": event.node}
        progress = Message("progress", data, broadcast=True)
        if event.preview is None:
            return [self._progress_state(), progress]
        meta = {
            "node_id": event.node,
            "prompt_id": self.prompt_id,
            "display_node_id": event.node,
            "parent_node_id": None,
            "real_node_id": event.node,
            "image_type": event.preview.image_type,
        }
        # ComfyUI's order: the progress handler sends `progress_state` and the type-4 frame, then
        # main.py's hook sends `progress` and, to a client without the metadata flag, the type-1 frame.
        return [
            self._progress_state(),
            PreviewFrame(event.preview, meta, with_metadata=True),
            progress,
            PreviewFrame(event.preview, meta, with_metadata=False),
        ]

    def _finished(self, unless: str | None = None) -> list[Message | PreviewFrame]:
        """The finishing `progress_state` of the node that ran last, once (none for `unless`: the node
        that failed or was interrupted, which ComfyUI never marks finished)."""
        node, self.unfinished = self.unfinished, None
        state = self.node_states.get(node or "")
        if node is None or node == unless or state is None:
            return []
        state.update(state="finished", value=state["max"])
        return [self._progress_state()]

    def _state(self, node: str, value: int, maximum: int, state: str) -> dict[str, Any]:
        return {
            "value": value,
            "max": maximum,
            "state": state,
            "node_id": node,
            "prompt_id": self.prompt_id,
            "display_node_id": node,
            "parent_node_id": None,
            "real_node_id": node,
        }

    def _progress_state(self) -> Message:
        nodes = {k: dict(v) for k, v in self.node_states.items()}
        return Message("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, broadcast=True)


def error_payload(event: ev.ExecutionError) -> dict[str, Any]:
    """`execution_error` as ComfyUI sends it (§3.7)."""
    return {
        "prompt_id": event.prompt_id,
        "node_id": event.node_id,
        "node_type": event.node_type,
        "executed": list(event.executed),
        "exception_message": event.message,
        "exception_type": event.exception_type,
        "traceback": list(event.traceback),
        "current_inputs": dict(event.current_inputs),
        "current_outputs": [],
        "timestamp": now_ms(),
    }
