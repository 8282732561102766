"""How a node is declared: one typed, declarative way, checked when the class is defined.

A node is a subclass of `Node` with a docstring (the canvas shows it), `INPUTS` and `OUTPUTS`
tuples and a `run(self, ctx, **inputs)` method. The declaration *is* the schema that
`/object_info` serialises, so what a user sees and what the executor checks cannot drift apart.

    class EmptyLatentImage(Node):
        \"\"\"Create a batch of empty latent images to denoise.\"\"\"
        DISPLAY_NAME = "Empty Latent Image"
        CATEGORY = "latent"
        INPUTS = (Int("width", 512, min=16, max=16384, step=8), ...)
        OUTPUTS = (Output(LATENT),)

        def run(self, ctx: RunContext, width: int, height: int, batch_size: int) -> tuple[Latent]:
            ...

Mistakes (an unknown type, a default out of range, a `run` that does not take an input, a
missing docstring) raise `NodeDeclarationError` at import.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from nodegraph.types import BOOLEAN, COMBO, FLOAT, HIDDEN_KINDS, INT, STRING, WIDGET_TYPES, SocketType

if TYPE_CHECKING:
    from nodegraph.env import Environment

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_RESOLUTION = 16384


class NodeDeclarationError(TypeError):
    """A node class is declared wrongly; raised when the class is defined."""


@dataclass(frozen=True)
class InputProblem:
    """Why a constant input value is unacceptable, in ComfyUI's error vocabulary."""

    type: str
    message: str
    details: str


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Input:
    """Base of every input declaration."""

    name: str
    optional: bool = field(default=False, kw_only=True)
    tooltip: str | None = field(default=None, kw_only=True)
    force_input: bool = field(default=False, kw_only=True)

    @property
    def type(self) -> SocketType:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The option dict of the `/object_info` entry, without `None` values."""
        opts: dict[str, Any] = {}
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        if self.force_input:
            opts["forceInput"] = True
        return opts

    def spec(self, env: Environment | None) -> Any:
        """`[TYPE, {options}]` as `/object_info` writes it (a bare kind string for hidden inputs)."""
        return [self.type.name, self.options()]

    def coerce(self, value: Any, env: Environment | None) -> Any:
        """Convert a constant from the prompt; raise `InputValueError` when it cannot be accepted."""
        return value

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input

    def default_value(self) -> Any:
        return None


class InputValueError(ValueError):
    """A constant input value failed its type or range check."""

    def __init__(self, problem: InputProblem, received: Any = None) -> None:
        super().__init__(f"{problem.message}: {problem.details}")
        self.problem = problem
        self.received = received


def _range_check(inp: Input, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise InputValueError(
            InputProblem("value_smaller_than_min", f"Value {value} smaller than min of {lo}", inp.name), value
        )
    if hi is not None and value > hi:
        raise InputValueError(
            InputProblem("value_bigger_than_max", f"Value {value} bigger than max of {hi}", inp.name), value
        )


def _conversion_error(inp: Input, value: Any, exc: Exception) -> InputValueError:
    problem = InputProblem(
        "invalid_input_type",
        f"Failed to convert an input value to a {inp.type.name} value",
        f"{inp.name}, {value!r}, {exc}",
    )
    return InputValueError(problem, value)


@dataclass(frozen=True)
class Int(Input):
    """An integer widget."""

    default: int = 0
    min: int | None = None
    max: int | None = None
    step: int = 1
    control_after_generate: bool = False
    display: str | None = None

    @property
    def type(self) -> SocketType:
        return INT

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"default": self.default}
        if self.min is not None:
            opts["min"] = self.min
        if self.max is not None:
            opts["max"] = self.max
        opts["step"] = self.step
        if self.control_after_generate:
            opts["control_after_generate"] = True
        if self.display:
            opts["display"] = self.display
        return opts | super().options()

    def coerce(self, value: Any, env: Environment | None) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _conversion_error(self, value, TypeError(f"expected a number, got {type(value).__name__}"))
        try:
            result = int(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _conversion_error(self, value, exc) from exc
        _range_check(self, result, self.min, self.max)
        return result

    def default_value(self) -> int:
        return self.default


@dataclass(frozen=True)
class Float(Input):
    """A floating-point widget."""

    default: float = 0.0
    min: float | None = None
    max: float | None = None
    step: float = 0.01
    round: float | None = None

    @property
    def type(self) -> SocketType:
        return FLOAT

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"default": self.default}
        if self.min is not None:
            opts["min"] = self.min
        if self.max is not None:
            opts["max"] = self.max
        opts["step"] = self.step
        if self.round is not None:
            opts["round"] = self.round
        return opts | super().options()

    def coerce(self, value: Any, env: Environment | None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _conversion_error(self, value, TypeError(f"expected a number, got {type(value).__name__}"))
        try:
            result = float(value)
        except (TypeError, ValueError) as exc:
            raise _conversion_error(self, value, exc) from exc
        if math.isnan(result):
            raise _conversion_error(self, value, ValueError("NaN is not a value"))
        _range_check(self, result, self.min, self.max)
        return result

    def default_value(self) -> float:
        return self.default


@dataclass(frozen=True)
class String(Input):
    """A text widget."""

    default: str = ""
    multiline: bool = False
    dynamic_prompts: bool = False

    @property
    def type(self) -> SocketType:
        return STRING

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"default": self.default}
        if self.multiline:
            opts["multiline"] = True
        if self.dynamic_prompts:
            opts["dynamicPrompts"] = True
        return opts | super().options()

    def coerce(self, value: Any, env: Environment | None) -> str:
        if isinstance(value, (dict, list)):
            raise _conversion_error(self, value, TypeError("expected text"))
        return str(value)

    def default_value(self) -> str:
        return self.default


@dataclass(frozen=True)
class Boolean(Input):
    """An on/off widget."""

    default: bool = False
    label_on: str | None = None
    label_off: str | None = None

    @property
    def type(self) -> SocketType:
        return BOOLEAN

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"default": self.default}
        if self.label_on:
            opts["label_on"] = self.label_on
        if self.label_off:
            opts["label_off"] = self.label_off
        return opts | super().options()

    def coerce(self, value: Any, env: Environment | None) -> bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off", ""):
                return False
            raise _conversion_error(self, value, ValueError("expected true or false"))
        if isinstance(value, (bool, int, float)):
            return bool(value)
        raise _conversion_error(self, value, TypeError("expected true or false"))

    def default_value(self) -> bool:
        return self.default


ChoiceSource = Sequence[str] | Callable[["Environment"], Sequence[str]]


@dataclass(frozen=True)
class Combo(Input):
    """A choice among strings: a fixed list, or one computed from the environment (files in a folder).

    A computed list is recomputed each time it is asked for, so files added to a models folder
    appear in the canvas and pass validation without a restart.
    """

    choices: ChoiceSource = ()
    default: str | None = None
    image_upload: bool = False
    check_membership: bool = True

    @property
    def type(self) -> SocketType:
        return COMBO

    def values(self, env: Environment | None) -> list[str]:
        if callable(self.choices):
            return list(self.choices(env)) if env is not None else []
        return list(self.choices)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.default is not None:
            opts["default"] = self.default
        if self.image_upload:
            opts["image_upload"] = True
        return opts | super().options()

    def spec(self, env: Environment | None) -> list[Any]:
        return [self.values(env), self.options()]

    def coerce(self, value: Any, env: Environment | None) -> str:
        if not isinstance(value, str):
            raise _conversion_error(self, value, TypeError("expected one of the listed choices"))
        if self.check_membership:
            values = self.values(env)
            if value not in values:
                shown = values if len(values) <= 20 else f"(list of length {len(values)})"
                raise InputValueError(
                    InputProblem(
                        "value_not_in_list", "Value not in list", f"{self.name}: '{value}' not in {shown}"
                    ),
                    value,
                )
        return value

    def default_value(self) -> str | None:
        if self.default is not None:
            return self.default
        return None if callable(self.choices) or not self.choices else self.choices[0]


@dataclass(frozen=True)
class Socket(Input):
    """An input that only a link can fill (MODEL, LATENT, ...)."""

    socket_type: SocketType = field(default=SocketType("?"))

    @property
    def type(self) -> SocketType:
        return self.socket_type

    @property
    def is_widget(self) -> bool:
        return False


@dataclass(frozen=True)
class Hidden(Input):
    """A value the executor supplies: PROMPT, EXTRA_PNGINFO or UNIQUE_ID."""

    kind: str = ""

    @property
    def type(self) -> SocketType:
        return SocketType(self.kind)

    @property
    def is_widget(self) -> bool:
        return False

    def spec(self, env: Environment | None) -> Any:
        return self.kind


# --------------------------------------------------------------------------------------------
# Outputs and results


@dataclass(frozen=True)
class Output:
    """One output socket."""

    type: SocketType
    name: str | None = None
    is_list: bool = False
    tooltip: str | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.type.name


@dataclass(frozen=True)
class Result:
    """What `run` returns when the node also shows something (`ui`, e.g. saved images)."""

    outputs: tuple[Any, ...] = ()
    ui: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Preview:
    """An encoded preview image sent while a node runs."""

    image_type: str  # "image/jpeg" or "image/png"
    data: bytes


class RunContext(Protocol):
    """What a running node may ask of the engine."""

    node_id: str
    env: Environment

    def progress(self, value: int, total: int, preview: Preview | None = None) -> None:
        """Report progress; also raises `Interrupted` if an interrupt was requested."""

    def check_interrupt(self) -> None:
        """Raise `Interrupted` if an interrupt was requested."""

    def warn(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        """Report one warning about this node (shown by the CLI and sent to the canvas)."""


class Interrupted(Exception):
    """Raised inside a node when the user interrupted the prompt."""


# --------------------------------------------------------------------------------------------
# The node base class


class Node:
    """Base class of every node. Subclasses declare; the metaclass-free checks run in __init_subclass__."""

    NODE_ID: ClassVar[str] = ""
    DISPLAY_NAME: ClassVar[str | None] = None
    CATEGORY: ClassVar[str] = "sd"
    INPUTS: ClassVar[tuple[Input, ...]] = ()
    OUTPUTS: ClassVar[tuple[Output, ...]] = ()
    OUTPUT_NODE: ClassVar[bool] = False
    NOT_IDEMPOTENT: ClassVar[bool] = False
    DEPRECATED: ClassVar[bool] = False
    EXPERIMENTAL: ClassVar[bool] = False
    PYTHON_MODULE: ClassVar[str] = "nodes"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.NODE_ID:
            cls.NODE_ID = cls.__name__
        _check_declaration(cls)

    def run(self, ctx: RunContext, **inputs: Any) -> tuple[Any, ...] | Result:
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, env: Environment, **constants: Any) -> Hashable:
        """Something that changes when the node's outside world does (a file's contents).

        Called with the constant inputs only (linked inputs are absent). The default, None,
        means the node's output depends on its inputs alone.
        """
        return None

    @classmethod
    def check_inputs(cls, env: Environment, **constants: Any) -> str | None:
        """Extra validation of constant inputs; return a message to reject them."""
        return None

    @classmethod
    def description(cls) -> str:
        return inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")

    @classmethod
    def input(cls, name: str) -> Input | None:
        for inp in cls.INPUTS:
            if inp.name == name:
                return inp
        return None

    @classmethod
    def info(cls, env: Environment | None) -> dict[str, Any]:
        """This node's `/object_info` entry, exactly as ComfyUI serialises it."""
        required: dict[str, Any] = {}
        optional: dict[str, Any] = {}
        hidden: dict[str, Any] = {}
        for inp in cls.INPUTS:
            target = hidden if isinstance(inp, Hidden) else optional if inp.optional else required
            target[inp.name] = inp.spec(env)
        inputs: dict[str, Any] = {"required": required}
        order: dict[str, list[str]] = {"required": list(required)}
        if optional:
            inputs["optional"] = optional
            order["optional"] = list(optional)
        if hidden:
            inputs["hidden"] = hidden
            order["hidden"] = list(hidden)
        info: dict[str, Any] = {
            "input": inputs,
            "input_order": order,
            "output": [o.type.name for o in cls.OUTPUTS],
            "output_is_list": [o.is_list for o in cls.OUTPUTS],
            "output_name": [o.display_name for o in cls.OUTPUTS],
            "name": cls.NODE_ID,
            "display_name": cls.DISPLAY_NAME or cls.NODE_ID,
            "description": cls.description(),
            "python_module": cls.PYTHON_MODULE,
            "category": cls.CATEGORY,
            "output_node": cls.OUTPUT_NODE,
        }
        if any(o.tooltip for o in cls.OUTPUTS):
            info["output_tooltips"] = [o.tooltip or "" for o in cls.OUTPUTS]
        if cls.DEPRECATED:
            info["deprecated"] = True
        if cls.EXPERIMENTAL:
            info["experimental"] = True
        return info


def _fail(cls: type, message: str) -> NodeDeclarationError:
    return NodeDeclarationError(f"node {cls.__module__}.{cls.__name__}: {message}")


def _check_declaration(cls: type[Node]) -> None:
    if not (cls.__doc__ or "").strip():
        raise _fail(cls, "needs a docstring; its first line is the description the canvas shows")
    if not isinstance(cls.INPUTS, tuple) or not isinstance(cls.OUTPUTS, tuple):
        raise _fail(cls, "INPUTS and OUTPUTS must be tuples")
    names = [inp.name for inp in cls.INPUTS]
    if len(set(names)) != len(names):
        raise _fail(cls, f"duplicate input names in {names}")
    for inp in cls.INPUTS:
        _check_input(cls, inp)
    for out in cls.OUTPUTS:
        if not isinstance(out, Output) or not isinstance(out.type, SocketType):
            raise _fail(cls, f"output {out!r} must be Output(SocketType)")
    if cls.run is Node.run:
        raise _fail(cls, "must define run(self, ctx, ...)")
    _check_run_signature(cls, names)


def _check_input(cls: type[Node], inp: Input) -> None:
    if not isinstance(inp, Input) or type(inp) is Input:
        raise _fail(cls, f"input {inp!r} must be Int, Float, String, Boolean, Combo, Socket or Hidden")
    if not inp.name.isidentifier():
        raise _fail(cls, f"input name {inp.name!r} is not an identifier")
    if isinstance(inp, Socket) and inp.socket_type.name in ("?", "*", "") or "," in inp.type.name:
        raise _fail(cls, f"input {inp.name!r} needs one concrete socket type")
    if isinstance(inp, Hidden) and inp.kind not in HIDDEN_KINDS:
        raise _fail(cls, f"hidden input {inp.name!r} has unknown kind {inp.kind!r}")
    if isinstance(inp, (Int, Float)):
        lo, hi, default = inp.min, inp.max, inp.default
        if lo is not None and hi is not None and lo > hi:
            raise _fail(cls, f"input {inp.name!r} has min {lo} > max {hi}")
        if (lo is not None and default < lo) or (hi is not None and default > hi):
            raise _fail(cls, f"input {inp.name!r} default {default} is outside [{lo}, {hi}]")
        if isinstance(inp, Int) and not isinstance(default, int):
            raise _fail(cls, f"input {inp.name!r} default must be an int")
    if isinstance(inp, Combo) and not callable(inp.choices):
        if isinstance(inp.choices, str) or not inp.choices:
            raise _fail(cls, f"combo {inp.name!r} needs a non-empty sequence of choices or a callable")
        if inp.default is not None and inp.default not in inp.choices:
            raise _fail(cls, f"combo {inp.name!r} default {inp.default!r} is not a choice")


def _check_run_signature(cls: type[Node], names: list[str]) -> None:
    sig = inspect.signature(cls.run)
    params = list(sig.parameters.values())[1:]  # drop self
    if not params or params[0].name != "ctx":
        raise _fail(cls, "run's first parameter after self must be ctx")
    rest = {p.name: p for p in params[1:]}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest.values())
    for inp in cls.INPUTS:
        param = rest.get(inp.name)
        if param is None and not takes_kwargs:
            raise _fail(cls, f"run() does not take input {inp.name!r}")
        if param is not None and inp.optional and param.default is inspect.Parameter.empty:
            raise _fail(cls, f"optional input {inp.name!r} needs a default in run()")
    for pname, param in rest.items():
        if param.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if pname not in names and param.default is inspect.Parameter.empty:
            raise _fail(cls, f"run() parameter {pname!r} is not a declared input")
