"""The executor: runs a validated prompt's output nodes and their ancestors, reusing cached outputs.

One prompt at a time, from one worker thread. The flow of `execute`:

1. The parsed prompt (`Validation.graph`: nodes, links, dependency graph, order) and every node's
   signature (`cache.node_signatures`).
2. Nodes whose signature is cached are done; walking back from the outputs, only uncached nodes
   (and their uncached ancestors) are scheduled.
3. Scheduled nodes run in topological order (networkx), output nodes first among the ready ones,
   each output stored in the cache as soon as the node finishes.
4. Everything is reported through events (`nodegraph.events`); the executor knows no server.

An interrupt (from any thread) is seen before each node and inside a node's progress calls. A
failing node stores nothing, so the cache stays consistent and the next prompt runs normally.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

from nodegraph.cache import CacheEntry, OutputCache, estimate_nbytes, node_signatures
from nodegraph.env import Environment
from nodegraph.events import (
    Emit,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    NodeWarning,
    Progress,
)
from nodegraph.memory_budget import check_node
from nodegraph.node import Hidden, Interrupted, Node, Preview, Result, preview_method_for
from nodegraph.prompt_graph import PromptGraph, parse_node
from nodegraph.registry import Registry
from nodegraph.types import EXTRA_PNGINFO, PROMPT, UNIQUE_ID
from nodegraph.validate import qualified_name
from nodegraph.value_lists import Outputs, run_over_lists

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_BYTES = 4 << 30


@dataclass
class Outcome:
    """How one prompt ended, with the UI outputs of every node that showed something."""

    status: Literal["success", "error", "interrupted"]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: ExecutionError | ExecutionInterrupted | None = None


class NodeOutputError(RuntimeError):
    """A node returned something other than one value per declared output."""


class _Context:
    """The `RunContext` a node gets: progress, interrupt checks and warnings for one node."""

    def __init__(
        self, executor: Executor, prompt_id: str, node_id: str, emit: Emit, preview_method: str
    ) -> None:
        self.node_id = node_id
        self.env = executor.env
        # This prompt's preview method (`preview_method_for`): "none" means build no previews.
        self.preview_method = preview_method
        self._executor = executor
        self._prompt_id = prompt_id
        self._emit = emit

    def progress(self, value: int, total: int, preview: Preview | None = None) -> None:
        self.check_interrupt()
        self._emit(Progress(self._prompt_id, self.node_id, int(value), int(total), preview))

    def check_interrupt(self) -> None:
        if self._executor.interrupt_requested:
            raise Interrupted(f"interrupted while running node {self.node_id}")

    def warn(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        self._emit(NodeWarning(self._prompt_id, self.node_id, message, dict(details or {})))

    def show(self, ui: Mapping[str, Any]) -> None:
        """Send UI output while the node still runs (an `executed` message; the final one replaces it).

        Never raises `Interrupted`: it is called mid-save (a training run's epoch end), where
        stopping would lose the file being finished; the node's next `progress` stops it.
        """
        self._emit(Executed(self._prompt_id, self.node_id, dict(ui), interim=True))


class Executor:
    """Runs validated prompts, one at a time, with an output cache shared between prompts."""

    def __init__(
        self,
        registry: Registry,
        env: Environment,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """Args:
        registry: the node classes.
        env: folders and services the nodes use.
        max_entries: the most node outputs the cache keeps.
        max_bytes: the estimated array bytes the cache keeps (models are the model store's).
        """
        self.registry = registry
        self.env = env
        self.cache = OutputCache(max_entries, max_bytes)
        self._objects: dict[tuple[str, str], Node] = {}
        self._interrupt = threading.Event()
        self._state_lock = threading.Lock()
        self._running: str | None = None

    @property
    def interrupt_requested(self) -> bool:
        return self._interrupt.is_set()

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop the running prompt (only if it is `prompt_id`, when given); thread-safe, idle is a no-op."""
        with self._state_lock:
            if self._running is not None and prompt_id in (None, self._running):
                self._interrupt.set()

    def reset(self) -> None:
        """Forget every cached output and node instance (ComfyUI's POST /free)."""
        self.cache.clear()
        self._objects.clear()

    def execute(
        self,
        prompt: PromptGraph | Mapping[str, Any],
        prompt_id: str,
        emit: Emit,
        *,
        extra_data: dict[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
    ) -> Outcome:
        """Run a validated prompt.

        Args:
            prompt: `Validation.graph`; or a prompt validated earlier as ComfyUI's dict (one read
                back from the queue), which is parsed here.
            prompt_id: reported in every event.
            emit: receives the events, on this thread.
            extra_data: the request's extra data; `extra_pnginfo` feeds EXTRA_PNGINFO inputs.
            outputs: the output node ids to run (validation's `outputs`); default the graph's
                targets, or every output node of a dict.
        """
        with self._state_lock:
            self._running = prompt_id
            self._interrupt.clear()
        try:
            run = _PromptRun(self, prompt_id, emit, extra_data or {})
            return run.execute(prompt, outputs)
        finally:
            with self._state_lock:
                self._running = None
                self._interrupt.clear()
            self.cache.unpin()

    def instance(self, node_id: str, cls: type[Node]) -> Node:
        """The node object for (node id, class): kept across prompts, as ComfyUI keeps them."""
        key = (node_id, cls.NODE_ID)
        obj = self._objects.get(key)
        if obj is None:
            obj = self._objects[key] = cls()
        return obj

    def forget_instances_except(self, keep: set[tuple[str, str]]) -> None:
        for key in [k for k in self._objects if k not in keep]:
            del self._objects[key]


class _PromptRun:
    """The state of one `Executor.execute` call."""

    def __init__(self, executor: Executor, prompt_id: str, emit: Emit, extra_data: dict[str, Any]) -> None:
        self.ex = executor
        self.prompt_id = prompt_id
        self.emit = emit
        self.extra_data = extra_data
        self.preview_method = preview_method_for(extra_data, executor.env.preview_method)
        self.entries: dict[str, CacheEntry] = {}
        self.outcome = Outcome("success")
        self.graph: PromptGraph | None = None

    def execute(self, prompt: PromptGraph | Mapping[str, Any], outputs: Sequence[str] | None) -> Outcome:
        self.emit(ExecutionStart(self.prompt_id))
        try:
            graph = self._graph(prompt, outputs)
        except nx.NetworkXUnfeasible:
            assert isinstance(prompt, Mapping)
            parsed = {nid: parse_node(nid, node, self.ex.registry) for nid, node in prompt.items()}
            first = next(n for n in (outputs or parsed) if n in parsed)
            return self._fail(first, parsed[first].cls, _CycleError("the prompt's links form a cycle"), {})
        self.graph = graph
        self.ex.forget_instances_except({(n, node.cls.NODE_ID) for n, node in graph.nodes.items()})
        signatures = node_signatures(graph, self.ex.env)
        self.ex.cache.pin(signatures.values())
        for node_id in graph.order:
            entry = self.ex.cache.get(signatures[node_id])
            if entry is not None:
                self.entries[node_id] = entry
        self._report_cached(graph)
        needed = self._needed(graph)
        # a cold run needs every node: the order computed at validation already is the schedule
        schedule = graph.order if len(needed) == len(graph.order) else graph.schedule(needed)
        for node_id in schedule:
            if not self._run_node(node_id, graph.nodes[node_id].cls, signatures[node_id]):
                return self.outcome
        self.emit(ExecutionSuccess(self.prompt_id))
        return self.outcome

    def _graph(self, prompt: PromptGraph | Mapping[str, Any], outputs: Sequence[str] | None) -> PromptGraph:
        """The parsed prompt for these outputs (a dict is parsed here: the queue's wire format)."""
        if not isinstance(prompt, PromptGraph):
            return PromptGraph.parse(prompt, self.ex.registry, outputs)
        if outputs is None or list(outputs) == list(prompt.targets):
            return prompt
        return prompt.restricted(outputs)

    def _report_cached(self, graph: PromptGraph) -> None:
        targets = graph.targets
        self.outcome.cached = [n for n in graph.nodes if n in self.entries]
        self.emit(ExecutionCached(self.prompt_id, tuple(self.outcome.cached)))
        for node_id in self.outcome.cached:
            ui = self.entries[node_id].ui
            if ui is not None:
                self.outcome.outputs[node_id] = dict(ui)
            if node_id in targets:  # shown again, not re-run (ComfyUI sends output null if it has none)
                self.emit(Executed(self.prompt_id, node_id, ui))

    def _needed(self, prompt: PromptGraph) -> set[str]:
        """The uncached nodes the targets need: walking back from them, stopping at cached nodes."""
        graph = prompt.graph
        needed: set[str] = set()
        stack = [t for t in prompt.targets if t not in self.entries]
        while stack:
            node_id = stack.pop()
            if node_id in needed:
                continue
            needed.add(node_id)
            stack.extend(p for p in graph.predecessors(node_id) if p not in self.entries and p not in needed)
        return needed

    def _run_node(self, node_id: str, cls: type[Node], signature: str) -> bool:
        hit = self.ex.cache.get(signature)
        if hit is not None:  # an identical node earlier in this prompt made it (ComfyUI checks here too)
            self._reuse(node_id, hit)
            return True
        inputs: dict[str, Any] = {}
        try:
            # ComfyUI announces the node, then sees a pending interrupt and names that node
            self.emit(Executing(self.prompt_id, node_id, cls.NODE_ID))
            if self.ex.interrupt_requested:
                raise Interrupted(f"interrupted before node {node_id}")
            inputs = self._inputs(node_id, cls)
            node = self.ex.instance(node_id, cls)
            context = _Context(self.ex, self.prompt_id, node_id, self.emit, self.preview_method)

            def call(kwargs: dict[str, Any]) -> Outputs:
                check_node(cls, kwargs)  # a size that came over a link was not checked when queued
                return _split_result(cls, node.run(context, **kwargs))

            # once, or once per item of a list output it reads (ComfyUI's list semantics)
            outputs, ui = run_over_lists(cls, inputs, call)
        except Interrupted:
            event = ExecutionInterrupted(self.prompt_id, node_id, cls.NODE_ID, tuple(self.outcome.executed))
            self.emit(event)
            self.outcome.status, self.outcome.error = "interrupted", event
            return False
        except Exception as exc:  # a node's failure is reported, never raised into the worker
            self._fail(node_id, cls, exc, inputs)
            return False
        entry = CacheEntry(outputs, ui, estimate_nbytes(outputs))
        self.entries[node_id] = entry
        self.ex.cache.put(signature, entry)
        self.outcome.executed.append(node_id)
        if ui is not None:
            self.outcome.outputs[node_id] = dict(ui)
            self.emit(Executed(self.prompt_id, node_id, ui))
        return True

    def _reuse(self, node_id: str, entry: CacheEntry) -> None:
        self.entries[node_id] = entry
        self.outcome.cached.append(node_id)
        if entry.ui is not None:
            self.outcome.outputs[node_id] = dict(entry.ui)
        # ComfyUI's `execute` finds it cached and sends `executed` (output null if it shows nothing)
        self.emit(Executed(self.prompt_id, node_id, entry.ui))

    def _inputs(self, node_id: str, cls: type[Node]) -> dict[str, Any]:
        assert self.graph is not None
        node = self.graph.nodes[node_id]
        kwargs: dict[str, Any] = {}
        for inp in cls.INPUTS:
            if isinstance(inp, Hidden):
                kwargs[inp.name] = self._hidden(inp.kind, node_id)
            elif inp.name in node.links:
                link = node.links[inp.name]
                kwargs[inp.name] = self.entries[link.source].outputs[link.slot]
            elif inp.name in node.constants:
                kwargs[inp.name] = node.constants[inp.name]
        if cls.EXTRA_INPUTS:
            declared = {inp.name for inp in cls.INPUTS}
            kwargs |= {name: v for name, v in node.constants.items() if name not in declared}
        return kwargs

    def _hidden(self, kind: str, node_id: str) -> Any:
        if kind == PROMPT:
            assert self.graph is not None
            return self.graph.wire
        if kind == EXTRA_PNGINFO:
            return self.extra_data.get("extra_pnginfo")
        if kind == UNIQUE_ID:
            return node_id
        return None

    def _fail(self, node_id: str, cls: type[Node], exc: Exception, inputs: dict[str, Any]) -> Outcome:
        lines = tuple(traceback.format_exception(type(exc), exc, exc.__traceback__))
        log.error("node %s (%s) failed:\n%s", node_id, cls.NODE_ID, "".join(lines))
        event = ExecutionError(
            self.prompt_id,
            node_id=node_id,
            node_type=cls.NODE_ID,
            exception_type=qualified_name(type(exc)),
            message=str(exc) or type(exc).__name__,
            traceback=lines,
            executed=tuple(self.outcome.executed),
            current_inputs={k: [_format_input(v)] for k, v in inputs.items()},
            current_outputs=tuple(self.entries),
        )
        self.emit(event)
        self.outcome.status, self.outcome.error = "error", event
        return self.outcome


class _CycleError(RuntimeError):
    """The prompt's links form a cycle (validation reports this first; kept for unvalidated prompts)."""


def _split_result(cls: type[Node], result: Any) -> tuple[tuple[Any, ...], Mapping[str, Any] | None]:
    """(outputs, ui) from what `run` returned, checked against the declared outputs."""
    ui: Mapping[str, Any] | None = None
    if isinstance(result, Result):
        outputs, ui = tuple(result.outputs), result.ui
    elif isinstance(result, dict) and ("ui" in result or "result" in result):  # ComfyUI's V1 return shape
        outputs, ui = tuple(result.get("result") or ()), result.get("ui")
    elif isinstance(result, (tuple, list)):
        outputs = tuple(result)
    elif result is None and not cls.OUTPUTS:
        outputs = ()
    else:
        raise NodeOutputError(
            f"{cls.NODE_ID}.run returned a {type(result).__name__}; return a tuple or Result"
        )
    if len(outputs) != len(cls.OUTPUTS):
        raise NodeOutputError(
            f"{cls.NODE_ID}.run returned {len(outputs)} values for {len(cls.OUTPUTS)} declared outputs"
        )
    return outputs, ui


def _format_input(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    return str(value)[:200]
