"""Stub nodes for the engine tests: plain numbers instead of models, so no torch is needed."""

from __future__ import annotations

import threading
from typing import Any

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.node import (
    Boolean,
    Combo,
    Float,
    Hidden,
    Int,
    Node,
    Output,
    Result,
    RunContext,
    Socket,
    String,
)
from nodegraph.registry import Registry
from nodegraph.types import FLOAT, SocketType

NUMBER = SocketType("NUMBER")
WORD = SocketType("WORD")


class Source(Node):
    """Emit a number."""

    INPUTS = (Int("value", 1, min=0, max=100, control_after_generate=True), Combo("mode", choices=("a", "b")))
    OUTPUTS = (Output(NUMBER),)
    RUNS = [0]

    def run(self, ctx: RunContext, value: int, mode: str) -> tuple[int]:
        Source.RUNS[0] += 1
        return (value if mode == "a" else -value,)


class Add(Node):
    """Add two numbers."""

    INPUTS = (Socket("a", socket_type=NUMBER), Socket("b", socket_type=NUMBER, optional=True))
    OUTPUTS = (Output(NUMBER, name="sum"),)

    def run(self, ctx: RunContext, a: int, b: int = 0) -> tuple[int]:
        return (a + b,)


class Scale(Node):
    """Multiply a number by a factor."""

    INPUTS = (Socket("x", socket_type=NUMBER), Float("factor", 1.0, min=0.0, max=10.0))
    OUTPUTS = (Output(NUMBER),)

    def run(self, ctx: RunContext, x: float, factor: float) -> tuple[float]:
        return (x * factor,)


class Ratio(Node):
    """Emit a FLOAT (to drive a widget converted to a socket)."""

    INPUTS = (Float("value", 0.5),)
    OUTPUTS = (Output(FLOAT),)

    def run(self, ctx: RunContext, value: float) -> tuple[float]:
        return (value,)


class Word(Node):
    """Emit a word (a socket type that does not fit NUMBER inputs)."""

    INPUTS = (String("text", "hi", dynamic_prompts=True),)
    OUTPUTS = (Output(WORD),)

    def run(self, ctx: RunContext, text: str) -> tuple[str]:
        return (text,)


class Show(Node):
    """Show a number (an output node)."""

    OUTPUT_NODE = True
    INPUTS = (
        Socket("x", socket_type=NUMBER),
        Hidden("prompt", kind="PROMPT"),
        Hidden("extra", kind="EXTRA_PNGINFO"),
    )
    OUTPUTS = ()
    SEEN: list[dict[str, Any]] = []

    def run(self, ctx: RunContext, x: float, prompt: Any = None, extra: Any = None) -> Result:
        Show.SEEN.append({"x": x, "prompt": prompt, "extra": extra, "node": ctx.node_id})
        return Result((), {"values": [x]})


class Fail(Node):
    """Fail when asked to."""

    INPUTS = (Socket("x", socket_type=NUMBER), Boolean("fail", True))
    OUTPUTS = (Output(NUMBER),)

    def run(self, ctx: RunContext, x: int, fail: bool) -> tuple[int]:
        if fail:
            raise ValueError("asked to fail")
        return (x,)


class Slow(Node):
    """Report progress for many steps; waits on `GATE` after the first step so a test can interrupt."""

    INPUTS = (Socket("x", socket_type=NUMBER), Int("steps", 1000, min=1, max=100000))
    OUTPUTS = (Output(NUMBER),)
    STARTED = threading.Event()
    GATE = threading.Event()
    STEPS_DONE: list[int] = []

    def run(self, ctx: RunContext, x: int, steps: int) -> tuple[int]:
        for step in range(steps):
            ctx.progress(step + 1, steps)
            Slow.STEPS_DONE.append(step + 1)
            if step == 0:
                Slow.STARTED.set()
                Slow.GATE.wait(5)
        return (x,)


class Pick(Node):
    """Pick a word from a list computed from the environment, with its own check."""

    INPUTS = (Combo("name", choices=lambda env: ["one", "two"]), Int("n", 1, min=0, max=5))
    OUTPUTS = (Output(NUMBER),)

    @classmethod
    def check_inputs(cls, env: Environment, n: int | None = None, **_: Any) -> str | None:
        return None if n is None or n < 50 else f"n must be below 50, got {n}"

    def run(self, ctx: RunContext, name: str, n: int) -> tuple[int]:
        return (n,)


def _unreadable(env: Environment) -> list[str]:
    raise OSError("models folder unreadable")


class Broken(Node):
    """A node whose choice list cannot be computed."""

    INPUTS = (Combo("name", choices=_unreadable),)
    OUTPUTS = (Output(NUMBER),)

    def run(self, ctx: RunContext, name: str) -> tuple[int]:
        return (0,)


class Stamp(Node):
    """A file-like node: its fingerprint is a module-level value a test can change."""

    INPUTS = (String("path", "x.txt"),)
    OUTPUTS = (Output(NUMBER),)
    CONTENTS: dict[str, int] = {}

    @classmethod
    def fingerprint(cls, env: Environment, path: str) -> int:
        return Stamp.CONTENTS.get(path, 0)

    def run(self, ctx: RunContext, path: str) -> tuple[int]:
        return (Stamp.CONTENTS.get(path, 0),)


class Random(Node):
    """A non-idempotent node: two of them with the same inputs must not share an output."""

    NOT_IDEMPOTENT = True
    INPUTS = (Int("seed", 0),)
    OUTPUTS = (Output(NUMBER),)
    COUNTER = [0]

    def run(self, ctx: RunContext, seed: int) -> tuple[int]:
        Random.COUNTER[0] += 1
        return (Random.COUNTER[0],)


class Warn(Node):
    """Pass a number through and warn once."""

    INPUTS = (Socket("x", socket_type=NUMBER),)
    OUTPUTS = (Output(NUMBER),)

    def run(self, ctx: RunContext, x: int) -> tuple[int]:
        ctx.warn("careful", {"why": "test"})
        return (x,)


class SaveText(Node):
    """Write a number to a text file in the output folder (an output node, like SaveImage)."""

    OUTPUT_NODE = True
    INPUTS = (Socket("x", socket_type=NUMBER), String("filename_prefix", "out"))
    OUTPUTS = ()

    def run(self, ctx: RunContext, x: float, filename_prefix: str) -> Result:
        folder = ctx.env.folders.output_dir
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{filename_prefix}_{len(list(folder.iterdir())):05}.txt"
        (folder / name).write_text(str(x))
        return Result((), {"texts": [{"filename": name, "subfolder": "", "type": "output"}]})


def _first_word(text: Any) -> str:
    return str(text).split(" ")[0]


class Pair(Node):
    """Two numbers from one node, each made from its own widget (a LoraLoader in miniature)."""

    INPUTS = (
        Socket("x", socket_type=NUMBER),
        Float("a", 1.0, min=-10.0, max=10.0),
        Float("b", 1.0, min=-10.0, max=10.0),
        String("note", "left right"),
    )
    OUTPUTS = (
        Output(NUMBER, name="left", depends_on=("x", "a", ("note", _first_word))),
        Output(NUMBER, name="right", depends_on=("x", "b")),
    )
    RUNS = [0]

    def run(self, ctx: RunContext, x: float, a: float, b: float, note: str) -> tuple[float, float]:
        Pair.RUNS[0] += 1
        return (x * a + len(_first_word(note)), x * b)


class PlainPair(Node):
    """Two numbers from one node, without dependency declarations (every output depends on every input)."""

    INPUTS = (Socket("x", socket_type=NUMBER), Float("a", 1.0), Float("b", 1.0))
    OUTPUTS = (Output(NUMBER, name="left"), Output(NUMBER, name="right"))

    def run(self, ctx: RunContext, x: float, a: float, b: float) -> tuple[float, float]:
        return (x * a, x * b)


STUBS: tuple[type[Node], ...] = (
    Source,
    Add,
    Scale,
    Word,
    Show,
    Fail,
    Slow,
    Pick,
    Stamp,
    Random,
    Warn,
    SaveText,
    Broken,
    Ratio,
    Pair,
    PlainPair,
)


def registry() -> Registry:
    return Registry(STUBS)


def environment(tmp: Any) -> Environment:
    return Environment(Folders.at(tmp))


def chain_prompt() -> dict[str, Any]:
    """src(1) -> scale(x2) -> show, and src -> add(src, scale) -> show2."""
    return {
        "1": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
        "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
        "4": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "5": {"class_type": "Show", "inputs": {"x": ["4", 0]}},
    }


def pair_prompt(kind: str = "Pair") -> dict[str, Any]:
    """src(1) -> pair(2); left -> scale(3) -> show(4); right -> scale(5) -> show(6)."""
    pair_inputs: dict[str, Any] = {"x": ["1", 0], "a": 2.0, "b": 3.0}
    if kind == "Pair":
        pair_inputs["note"] = "left right"
    return {
        "1": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
        "2": {"class_type": kind, "inputs": pair_inputs},
        "3": {"class_type": "Scale", "inputs": {"x": ["2", 0], "factor": 1.0}},
        "4": {"class_type": "Show", "inputs": {"x": ["3", 0]}},
        "5": {"class_type": "Scale", "inputs": {"x": ["2", 1], "factor": 1.0}},
        "6": {"class_type": "Show", "inputs": {"x": ["5", 0]}},
    }


def reset_stub_state() -> None:
    """Empty the stubs' class-level records (run counts, what they saw), so no test sees another's."""
    Source.RUNS[0] = 0
    Pair.RUNS[0] = 0
    Show.SEEN.clear()
    Slow.STEPS_DONE.clear()
    Stamp.CONTENTS.clear()
