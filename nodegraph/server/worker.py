"""The one executor thread: take a prompt, run it, file its history, tell the clients; repeat.

The event loop never waits on a node: the executor runs here, and its events travel to the loop
through `Hub.send_sync`. Any exception escaping the executor is recorded as that prompt's error and
the loop goes on to the next prompt.
"""

from __future__ import annotations

import gc
import logging
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from nodegraph import events as ev
from nodegraph.node import preview_method_for
from nodegraph.server.messages import Message, PreviewFrame, PromptMessages
from nodegraph.server.queue import PromptStore, QueueItem
from nodegraph.server.ws import Hub

if TYPE_CHECKING:
    from nodegraph.env import Environment
    from nodegraph.executor import Outcome

log = logging.getLogger(__name__)

Finished = Callable[[str, dict[str, Any]], None]


def status_message(remaining: int, sid: str | None = None) -> Message:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
    if sid is not None:
        data["sid"] = sid
    return Message("status", data, broadcast=True)


class PromptRunner(Protocol):
    """What a worker runs prompts on: the engine's `Executor`, or Ray's `ray_pool.RemoteExecutor`."""

    @property
    def env(self) -> Environment: ...  # its preview method decides which frames reach the clients

    def execute(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        emit: ev.Emit,
        *,
        extra_data: dict[str, Any] | None = None,
        outputs: list[str] | None = None,
    ) -> Outcome: ...

    def interrupt(self, prompt_id: str | None = None) -> None: ...


class PromptWorker(Protocol):
    """What the routes need from whatever runs prompts: this module's `Worker`, or Ray's workers."""

    running_id: str | None  # the running prompt (with several workers: the first one's)
    step: tuple[int, int] | None  # its sampler step and step count
    preview: Any  # its latest preview frame

    def start(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def interrupt(self, prompt_id: str | None = None) -> bool: ...
    def request_free(self, unload_models: bool, free_memory: bool) -> None: ...
    def broadcast_status(self) -> None: ...
    def on_connect(self, sid: str) -> list[Message]: ...
    def describe(self) -> list[dict[str, Any]]: ...
    def outputs_so_far(self, prompt_id: str) -> dict[str, Any]: ...
    def nodes_so_far(self, prompt_id: str) -> tuple[int, int]: ...


class Worker:
    """Runs queued prompts one at a time on a background thread."""

    def __init__(
        self,
        store: PromptStore,
        executor: PromptRunner,
        hub: Hub,
        on_finished: Finished,
        free: Callable[[bool, bool], None],
        after: Callable[[], None] | None = None,
    ) -> None:
        self.after = after  # housekeeping after each prompt (temp previews)
        self.store = store
        self.executor = executor
        self.hub = hub
        self.on_finished = on_finished
        self.free = free
        self.name: str | None = None  # set when several workers run prompts: recorded in the history
        self.running_id: str | None = None
        self.running_client: str | None = None
        self.current_node: str | None = None
        # The running prompt's latest step and preview, for polling clients (A1111's /progress).
        self.step: tuple[int, int] | None = None
        self.preview: Any = None
        self._messages: PromptMessages | None = None  # the running prompt's, with its outputs so far
        self._free_flags: tuple[bool, bool] | None = None
        self._cancelled: set[str] = set()  # interrupted before (or while) the executor runs them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nodegraph-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current prompt (interrupting it); what is pending stays queued."""
        self._stop.set()
        if self.running_id is not None:
            self.interrupt(self.running_id)
        self._thread.join(timeout)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (only if it is `prompt_id`, when given). True if one was.

        A prompt the worker has taken but not yet handed to the executor counts as running: it is
        marked here and stopped before its first node.
        """
        running = self.running_id
        target = prompt_id if prompt_id is not None else running
        if target is None:
            return False
        if target != running and self.store.state_of(target) != "running":
            return False
        self._cancelled.add(target)
        self.executor.interrupt(target)
        return True

    def describe(self) -> list[dict[str, Any]]:
        """The one in-process worker, for /system_stats."""
        return [{"name": self.name or "local", "running": self.running_id}]

    def outputs_so_far(self, prompt_id: str) -> dict[str, Any]:
        """The UI outputs `prompt_id`'s nodes have shown so far, while it runs (else empty)."""
        messages = self._messages
        if messages is None or messages.prompt_id != prompt_id:
            return {}
        return dict(messages.outputs)  # a copy made under the GIL, while the worker adds to it

    def nodes_so_far(self, prompt_id: str) -> tuple[int, int]:
        """(nodes finished, nodes in the prompt) of `prompt_id` while it runs, else (0, 0)."""
        messages = self._messages
        if messages is None or messages.prompt_id != prompt_id:
            return 0, 0
        return messages.nodes_done(), messages.total

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's `/free`: handled between prompts, never while a node runs."""
        old = self._free_flags or (False, False)
        self._free_flags = (old[0] or unload_models, old[1] or free_memory)

    def broadcast_status(self) -> None:
        self.hub.broadcast_sync(status_message(self.store.remaining()))

    def on_connect(self, sid: str) -> list[Message]:
        """What a new socket hears first: the queue size and, for the running prompt's client, its node."""
        sent = [status_message(self.store.remaining(), sid)]
        if sid == self.running_client and self.current_node is not None:
            data = {
                "node": self.current_node,
                "display_node": self.current_node,
                "prompt_id": self.running_id,
            }
            sent.append(Message("executing", data))
        return sent

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.store.take(timeout=0.25)
            except Exception:  # the database closed under us during shutdown
                if self._stop.is_set():
                    return
                log.exception("cannot read the prompt queue")
                continue
            self._maybe_free()  # before the next prompt, so a /free sent before it applies to it
            if item is not None:
                self._run(item)

    def _run(self, item: QueueItem) -> None:
        client = item.extra_data.get("client_id")
        client_id = str(client) if client is not None else None
        self.running_id, self.running_client = item.prompt_id, client_id
        self.step = self.preview = None
        self.broadcast_status()
        messages = self._messages = PromptMessages(item.prompt_id, total=len(item.prompt))
        server_method = self.executor.env.preview_method
        # ComfyUI sends binary previews only when the server or this prompt's client asked for them.
        previews = preview_method_for(item.extra_data, server_method) != "none"

        def emit(event: ev.Event) -> None:
            if isinstance(event, ev.Executing):
                self.current_node = event.node
            elif isinstance(event, ev.Progress):
                self.step = (event.value, event.max)
                self.preview = event.preview or self.preview
            for message in messages.translate(event):
                if previews or not isinstance(message, PreviewFrame):
                    self.hub.send_sync(message, client_id)

        status = self._execute(item, emit, messages)
        self._cancelled.discard(item.prompt_id)
        if status != "success" and self._stop.is_set():
            # Stopped under it: keep it queued for the next start instead of filing an interruption.
            self.store.requeue(item.prompt_id)
            self.running_id = self.running_client = self.current_node = self._messages = None
            return
        entry = history_entry(item, messages, status)
        if self.name is not None:
            entry["worker"] = self.name
        try:
            self.store.finish(item.prompt_id, entry)
        except Exception as exc:  # the store keeps it in memory and takes it off the queue
            log.error("could not save the history of prompt %s: %s", item.prompt_id, exc)
        if self.after is not None:
            try:
                self.after()
            except Exception:
                log.exception("housekeeping after prompt %s failed", item.prompt_id)
        self.running_id = self.running_client = self.current_node = self._messages = None
        self.broadcast_status()  # ComfyUI's order: the queue's status (task_done), then "executing: null"
        self.hub.send_sync(messages.done(), client_id)
        self.on_finished(item.prompt_id, entry)

    def _execute(self, item: QueueItem, emit: ev.Emit, messages: PromptMessages) -> str:
        if item.prompt_id in self._cancelled:
            self._cancelled.discard(item.prompt_id)
            emit(ev.ExecutionInterrupted(item.prompt_id, None, None))
            return "interrupted"
        try:
            outcome = self.executor.execute(
                item.prompt, item.prompt_id, emit, extra_data=item.extra_data, outputs=item.outputs
            )
        except Exception as exc:  # an executor bug must cost one prompt, not the worker
            log.exception("prompt %s failed outside any node", item.prompt_id)
            emit(
                ev.ExecutionError(
                    item.prompt_id,
                    node_id="",
                    node_type="",
                    exception_type=type(exc).__name__,
                    message=f"the engine failed while running this prompt: {exc}",
                    traceback=tuple(traceback.format_exception(exc)),
                )
            )
            return "error"
        for node, ui in outcome.outputs.items():
            messages.outputs.setdefault(str(node), ui)
        return outcome.status

    def _maybe_free(self) -> None:
        flags, self._free_flags = self._free_flags, None
        if flags is None:
            return
        try:
            self.free(*flags)
        except Exception:
            log.exception("freeing memory failed")
        gc.collect()


def history_entry(item: QueueItem, messages: PromptMessages, status: str) -> dict[str, Any]:
    """ComfyUI's history entry (§3.8)."""
    ok = status == "success"
    meta = {
        node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
        for node in messages.outputs
    }
    return {
        "prompt": item.as_list(),
        "outputs": messages.outputs,
        "status": {"status_str": "success" if ok else "error", "completed": ok, "messages": messages.history},
        "meta": meta,
    }
