"""Sizes that arrive over a link are checked against free memory before the node allocates (D7).

The server refuses literal sizes when a prompt is queued; a width from a primitive node is known
only when the prompt runs, so the executor checks each node's resolved inputs first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine_stubs import NUMBER, Show, environment

from nodegraph import events as ev
from nodegraph.executor import Executor
from nodegraph.memory_budget import OverMemoryBudget, check_node
from nodegraph.node import Int, Node, Output, RunContext
from nodegraph.registry import Registry
from nodegraph.types import INT
from nodegraph.validate import validate_prompt

HUGE = 1 << 20


class Primitive(Node):
    """An integer from a widget (ComfyUI's PrimitiveInt)."""

    INPUTS = (Int("value", 0, min=0, max=HUGE),)
    OUTPUTS = (Output(INT),)

    def run(self, ctx: RunContext, value: int) -> tuple[int]:
        return (value,)


class Canvas(Node):
    """Would allocate width x height x batch_size pixels (an EmptyImage in miniature)."""

    INPUTS = (
        Int("width", 64, min=1, max=HUGE),
        Int("height", 64, min=1, max=HUGE),
        Int("batch_size", 1, min=1, max=4096),
    )
    OUTPUTS = (Output(NUMBER),)
    RUNS = [0]

    def run(self, ctx: RunContext, width: int, height: int, batch_size: int) -> tuple[float]:
        Canvas.RUNS[0] += 1
        return (float(width * height * batch_size),)


def _run(tmp_path: Path, width: int, height: int) -> tuple[Any, list[ev.Event]]:
    registry = Registry((Primitive, Canvas, Show))
    executor = Executor(registry, environment(tmp_path))
    prompt = {
        "1": {"class_type": "Primitive", "inputs": {"value": width}},
        "2": {"class_type": "Canvas", "inputs": {"width": ["1", 0], "height": height, "batch_size": 64}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
    }
    checked = validate_prompt(prompt, registry, executor.env)
    assert checked.ok, checked.node_errors
    events: list[ev.Event] = []
    return executor.execute(checked.graph or checked.prompt, "p1", events.append), events


def test_a_linked_width_over_the_memory_left_fails_that_node_before_it_runs(tmp_path: Path) -> None:
    Canvas.RUNS[0] = 0
    outcome, events = _run(tmp_path, HUGE, HUGE)  # 64 x 2**40 pixels: 768 TiB
    assert outcome.status == "error"
    error = next(e for e in events if isinstance(e, ev.ExecutionError))
    assert error.node_id == "2" and error.node_type == "Canvas"
    assert error.exception_type.endswith("OverMemoryBudget")
    assert f"64 x {HUGE}x{HUGE} images need about" in error.message and "memory free" in error.message
    assert Canvas.RUNS[0] == 0  # refused before it allocated anything


def test_a_linked_width_that_fits_runs(tmp_path: Path) -> None:
    Canvas.RUNS[0] = 0
    outcome, _ = _run(tmp_path, 64, 64)
    assert outcome.status == "success" and Canvas.RUNS[0] == 1


def test_check_node_reads_width_height_and_batch() -> None:
    check_node({"width": 512, "height": 512, "batch_size": 4}, available=512 * 512 * 4 * 12)
    check_node({"width": "512", "height": 512}, available=0)  # not integers: nothing to estimate
    try:
        check_node({"width": 512, "height": 512, "batch_size": 4}, available=512 * 512 * 4 * 12 - 1)
    except OverMemoryBudget as exc:
        assert "4 x 512x512" in str(exc)
    else:
        raise AssertionError("an estimate one byte over the budget must be refused")
