"""Sizes that arrive over a link are checked against free memory before the node allocates (D7).

The server refuses literal sizes when a prompt is queued; a width from a primitive node is known
only when the prompt runs, so the executor checks each node's resolved inputs first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine_stubs import environment

from nodegraph import events as ev
from nodegraph.executor import Executor
from nodegraph.memory_budget import OverMemoryBudget, check_node
from nodegraph.node import Int, Node, Output, RunContext, Socket
from nodegraph.registry import Registry
from nodegraph.types import CONDITIONING, IMAGE, INT
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
    OUTPUTS = (Output(IMAGE),)
    RUNS = [0]

    def run(self, ctx: RunContext, width: int, height: int, batch_size: int) -> tuple[float]:
        Canvas.RUNS[0] += 1
        return (float(width * height * batch_size),)


class SizeConditioning(Node):
    """Width and height as numbers in conditioning (CLIPTextEncodeSDXL's): no tensor of that size."""

    INPUTS = (Int("width", 64, min=1, max=HUGE), Int("height", 64, min=1, max=HUGE))
    OUTPUTS = (Output(CONDITIONING),)

    def run(self, ctx: RunContext, width: int, height: int) -> tuple[float]:
        return (float(width + height),)


class Measure(Node):
    """Show the number an image or conditioning stands for (an output node)."""

    OUTPUT_NODE = True
    INPUTS = (
        Socket("image", socket_type=IMAGE, optional=True),
        Socket("cond", socket_type=CONDITIONING, optional=True),
    )
    OUTPUTS = ()

    def run(self, ctx: RunContext, image: float = 0.0, cond: float = 0.0) -> tuple[()]:
        return ()


def _run(tmp_path: Path, width: int, height: int, node: str = "Canvas") -> tuple[Any, list[ev.Event]]:
    registry = Registry((Primitive, Canvas, SizeConditioning, Measure))
    executor = Executor(registry, environment(tmp_path))
    inputs: dict[str, Any] = {"width": ["1", 0], "height": height}
    if node == "Canvas":
        inputs["batch_size"] = 64
    prompt = {
        "1": {"class_type": "Primitive", "inputs": {"value": width}},
        "2": {"class_type": node, "inputs": inputs},
        "3": {"class_type": "Measure", "inputs": {"image" if node == "Canvas" else "cond": ["2", 0]}},
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


def test_a_linked_width_that_is_not_a_tensor_size_runs(tmp_path: Path) -> None:
    outcome, _ = _run(tmp_path, HUGE, HUGE, node="SizeConditioning")
    assert outcome.status == "success"


def test_check_node_reads_width_height_and_batch() -> None:
    check_node(Canvas, {"width": 512, "height": 512, "batch_size": 4}, available=512 * 512 * 4 * 12)
    check_node(Canvas, {"width": "512", "height": 512}, available=0)  # not integers: nothing to estimate
    check_node(SizeConditioning, {"width": HUGE, "height": HUGE}, available=0)  # numbers, not a tensor
    try:
        check_node(Canvas, {"width": 512, "height": 512, "batch_size": 4}, available=512 * 512 * 4 * 12 - 1)
    except OverMemoryBudget as exc:
        assert "4 x 512x512" in str(exc)
    else:
        raise AssertionError("an estimate one byte over the budget must be refused")
