"""Executor overhead: per executed node on a 1,000-node chain, and a fully cached 100-node graph.

Targets (issue 8): under 50 µs per executed node; under 5 ms to re-run a fully cached 100-node graph.
The nodes do nothing, so the figures are the engine's own cost: signatures, scheduling, events,
caching. Run: `python -m bench.engine`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

from bench import record, table
from nodegraph.env import Environment
from nodegraph.events import Event
from nodegraph.executor import Executor
from nodegraph.folders import Folders
from nodegraph.node import Int, Node, Output, Result, RunContext, Socket
from nodegraph.registry import Registry
from nodegraph.types import INT
from nodegraph.validate import validate_prompt


class Start(Node):
    """A constant."""

    INPUTS = (Int("value", 0),)
    OUTPUTS = (Output(INT),)

    def run(self, ctx: RunContext, value: int) -> tuple[int]:
        return (value,)


class Step(Node):
    """Add one."""

    INPUTS = (Socket("x", socket_type=INT), Int("add", 1))
    OUTPUTS = (Output(INT),)

    def run(self, ctx: RunContext, x: int, add: int) -> tuple[int]:
        return (x + add,)


class End(Node):
    """Show the result."""

    OUTPUT_NODE = True
    INPUTS = (Socket("x", socket_type=INT),)

    def run(self, ctx: RunContext, x: int) -> Result:
        return Result((), {"value": [x]})


def chain(length: int, start: int = 0) -> dict[str, Any]:
    """Start -> Step x (length - 2) -> End."""
    prompt: dict[str, Any] = {"0": {"class_type": "Start", "inputs": {"value": start}}}
    for i in range(1, length - 1):
        prompt[str(i)] = {"class_type": "Step", "inputs": {"x": [str(i - 1), 0], "add": 1}}
    prompt[str(length - 1)] = {"class_type": "End", "inputs": {"x": [str(length - 2), 0]}}
    return prompt


def _ignore(event: Event) -> None:
    pass


class Clock:
    """Wall and CPU time of a block; CPU time is the fair figure on a machine shared with other jobs."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def measure(repeats: int = 9) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) seconds per repeat for each measure."""
    registry = Registry((Start, Step, End))
    env = Environment(Folders.at(tempfile.mkdtemp(prefix="nodegraph-bench-")))
    executor = Executor(registry, env)
    runs: dict[str, list[tuple[float, float]]] = {
        "cold": [],
        "validate": [],
        "cached": [],
        "cached_total": [],
    }
    for r in range(repeats):
        with Clock() as check:
            checked = validate_prompt(chain(1000, start=r), registry, env)
        with Clock() as cold:
            outcome = executor.execute(checked.prompt, "cold", _ignore, outputs=checked.outputs)
        assert outcome.status == "success" and len(outcome.executed) == 1000
        small = chain(100, start=10_000 + r)
        first = validate_prompt(small, registry, env)
        executor.execute(first.prompt, "warm", _ignore, outputs=first.outputs)
        with Clock() as total:
            again = validate_prompt(small, registry, env)
            with Clock() as cached:
                outcome = executor.execute(again.prompt, "cached", _ignore, outputs=again.outputs)
        assert outcome.executed == [] and len(outcome.cached) == 100
        for key, clock in (("cold", cold), ("validate", check), ("cached", cached), ("cached_total", total)):
            runs[key].append((clock.wall, clock.cpu))
    return runs


def main() -> None:
    runs = measure()

    def cells(key: str, scale: float, unit: str, digits: int) -> list[str]:
        wall = [w * scale for w, _ in runs[key]]
        cpu = [c * scale for _, c in runs[key]]
        figures = (min(wall), statistics.median(wall), statistics.median(cpu))
        return [f"{x:.{digits}f} {unit}" for x in figures]

    per_node = 1e6 / 1000  # seconds for 1,000 nodes -> µs per node
    rows = [
        ["executor time per executed node, 1,000-node chain", *cells("cold", per_node, "µs", 1), "< 50 µs"],
        ["validation of the 1,000-node chain", *cells("validate", 1e3, "ms", 1), "-"],
        ["re-run of a fully cached 100-node graph", *cells("cached", 1e3, "ms", 2), "< 5 ms"],
        ["same, including validation", *cells("cached_total", 1e3, "ms", 2), "-"],
    ]
    headers = ["measure (9 runs)", "best wall", "median wall", "median CPU", "target"]
    lines = table(headers, rows)
    print("\n".join(lines))
    record("Engine", lines)


if __name__ == "__main__":
    main()
