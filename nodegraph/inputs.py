"""Input declarations: the widgets and sockets a node declares, with ComfyUI's option names.

Each kind knows its `/object_info` spec and how to coerce and check a constant from a prompt,
raising `InputValueError` with ComfyUI's error type (`value_smaller_than_min`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from nodegraph.types import BOOLEAN, COMBO, FLOAT, INT, STRING, WIDGET_TYPES, SocketType

if TYPE_CHECKING:
    from nodegraph.env import Environment

_N = TypeVar("_N", int, float)


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
    advanced: bool = field(default=False, kw_only=True)  # the canvas folds it away (ComfyUI's "advanced")

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
        if self.advanced:
            opts["advanced"] = True
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


def _bounds_options(default: float, lo: float | None, hi: float | None, step: float) -> dict[str, Any]:
    """A number widget's `default`, `min`, `max` (when set) and `step` options, in ComfyUI's order."""
    opts: dict[str, Any] = {"default": default}
    if lo is not None:
        opts["min"] = lo
    if hi is not None:
        opts["max"] = hi
    opts["step"] = step
    return opts


def _converted(inp: Input, value: Any, convert: Callable[[Any], _N]) -> _N:
    """`convert(value)` for a number widget; a bool, a non-number or a failed conversion (an integer
    too large for a float included) is an `InputValueError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _conversion_error(inp, value, TypeError(f"expected a number, got {type(value).__name__}"))
    try:
        return convert(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _conversion_error(inp, value, exc) from exc


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
        opts = _bounds_options(self.default, self.min, self.max, self.step)
        if self.control_after_generate:
            opts["control_after_generate"] = True
        if self.display:
            opts["display"] = self.display
        return opts | super().options()

    def coerce(self, value: Any, env: Environment | None) -> int:
        result = _converted(self, value, int)
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
        opts = _bounds_options(self.default, self.min, self.max, self.step)
        if self.round is not None:
            opts["round"] = self.round
        return opts | super().options()

    def coerce(self, value: Any, env: Environment | None) -> float:
        result = _converted(self, value, float)
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
