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
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

# The input kinds live in inputs.py and file_inputs.py; they are re-exported here so a node module
# imports one place.
from nodegraph.file_inputs import FileChoice, ImageUpload
from nodegraph.inputs import (
    Boolean,
    ChoiceSource,
    Combo,
    Float,
    Hidden,
    Input,
    InputProblem,
    InputValueError,
    Int,
    Socket,
    String,
)
from nodegraph.types import HIDDEN_KINDS, SocketType

if TYPE_CHECKING:
    from nodegraph.env import Environment

MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_RESOLUTION = 16384

__all__ = [
    "MAX_RESOLUTION",
    "MAX_SEED",
    "Boolean",
    "ChoiceSource",
    "Combo",
    "Dependency",
    "FileChoice",
    "Float",
    "Hidden",
    "ImageUpload",
    "Input",
    "InputProblem",
    "InputValueError",
    "Int",
    "Interrupted",
    "Node",
    "NodeDeclarationError",
    "Output",
    "Preview",
    "Result",
    "RunContext",
    "Socket",
    "String",
]


class NodeDeclarationError(TypeError):
    """A node class is declared wrongly; raised when the class is defined."""


# --------------------------------------------------------------------------------------------
# Outputs and results


# An entry of `Output.depends_on`: an input name, or (input name, what of its constant value counts).
Dependency = str | tuple[str, Callable[[Any], Hashable]]


@dataclass(frozen=True)
class Output:
    """One output socket.

    `depends_on` names the inputs this output's value is made from, when that is fewer than all of
    them: a consumer's cache key is then made of those inputs only, so changing another input re-runs
    this node but not that consumer (LoraLoader's CLIP output does not depend on `strength_model`).
    An entry `(name, f)` counts only `f(value)` of a constant input (the part of a prompt's LoRA
    tags that touches the text encoder). None means every input; the node's fingerprint, class and
    (for nodes that read their id) id always count.
    """

    type: SocketType
    name: str | None = None
    is_list: bool = False
    tooltip: str | None = None
    depends_on: tuple[Dependency, ...] | None = None

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


PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")


def preview_method_for(extra_data: Mapping[str, Any], server_method: str) -> str:
    """The preview method of one prompt: the client's `extra_data.preview_method` (the canvas sends its
    "Live preview method" setting there) unless absent or "default", else the server's `--preview-method`.

    ComfyUI sends no preview frames unless one of the two asks for them; a client that never asked
    (a script reading every binary frame as an output image) gets none.
    """
    asked = extra_data.get("preview_method")
    return asked if isinstance(asked, str) and asked in PREVIEW_METHODS else server_method


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
    # Constant inputs the node does not declare reach run() as keyword arguments (rgthree's
    # FlexibleOptionalInputType: Power Lora Loader's `lora_1`, `lora_2`, ... rows). Off for every
    # other node, whose stray inputs are ignored as ComfyUI ignores them.
    EXTRA_INPUTS: ClassVar[bool] = False
    # ComfyUI's INPUT_IS_LIST: run once with every input as a list (a list output's items, any other
    # value as a one-item list) instead of once per item; `nodegraph.value_lists` has the rules.
    INPUT_IS_LIST: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.NODE_ID:
            cls.NODE_ID = cls.__name__
        _check_declaration(cls)

    # ctx is positional-only and *args is there so that mypy accepts every node's narrower
    # `run(self, ctx, model: ModelHandle, ...)` as an override; the executor passes inputs by name.
    def run(self, ctx: RunContext, /, *args: Any, **inputs: Any) -> tuple[Any, ...] | Result:
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, env: Environment, /, *args: Any, **constants: Any) -> Hashable:
        """Something that changes when the node's outside world does (a file's contents).

        Called with the constant inputs only (linked inputs are absent). The default, None,
        means the node's output depends on its inputs alone.
        """
        return None

    @classmethod
    def after_crash(cls, env: Environment, /, **constants: Any) -> str | None:
        """Called at the next start for a prompt that held this node when the server died mid-run.

        None (the default): the prompt is queued again once, as any other. A message: the prompt
        goes to the history as failed with it instead, for a run too long or too costly to repeat
        unasked (a training run: the message names the files it had saved).
        """
        return None

    @classmethod
    def check_inputs(cls, env: Environment, /, *args: Any, **constants: Any) -> str | None:
        """Extra validation of constant inputs; return a message to reject them."""
        return None

    @classmethod
    def from_ui_widgets(cls, values: list[Any], properties: Mapping[str, Any]) -> dict[str, Any] | None:
        """The API inputs a canvas node's `widgets_values` stand for, when the node's frontend code
        keeps widgets of its own (rgthree's rows); None maps them positionally onto the declared
        widget inputs, the frontend's default.

        Args:
            values: the node's `widgets_values` list as saved.
            properties: the node's `properties` (a frontend setting may change what is sent).
        """
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
        _check_depends_on(cls, out)
    if cls.run is Node.run:
        raise _fail(cls, "must define run(self, ctx, ...)")
    _check_run_signature(cls, names)


def _check_depends_on(cls: type[Node], out: Output) -> None:
    if out.depends_on is None:
        return
    if not isinstance(out.depends_on, tuple):
        raise _fail(cls, f"output {out.display_name}: depends_on must be a tuple of input names")
    inputs = {inp.name: inp for inp in cls.INPUTS}
    for entry in out.depends_on:
        name = entry if isinstance(entry, str) else entry[0]
        inp = inputs.get(name)
        if inp is None or isinstance(inp, Hidden):
            raise _fail(cls, f"output {out.display_name} depends on {name!r}, which is not a declared input")
        if not isinstance(entry, str) and not callable(entry[1]):
            raise _fail(cls, f"output {out.display_name}: ({name!r}, f) needs a callable f")


def _valid_input_name(name: str) -> bool:
    """An identifier, or a dotted key prefix such as ModelMergeSD1's `input_blocks.0.` (such an input
    reaches run() through its `**kwargs` only)."""
    if name.isidentifier():
        return True
    parts = name.removesuffix(".").split(".")
    return "." in name and all(p.isidentifier() or p.isdigit() for p in parts)


def _check_input(cls: type[Node], inp: Input) -> None:
    if not isinstance(inp, Input) or type(inp) is Input:
        raise _fail(
            cls,
            f"input {inp!r} must be Int, Float, String, Boolean, Combo, FileChoice, ImageUpload, "
            "Socket or Hidden",
        )
    if not _valid_input_name(inp.name):
        raise _fail(cls, f"input name {inp.name!r} is not an identifier (or ComfyUI's dotted key prefix)")
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
    if (
        isinstance(inp, Combo)
        and not callable(inp.choices)
        and not isinstance(inp, (FileChoice, ImageUpload))
    ):
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
    if cls.EXTRA_INPUTS and not takes_kwargs:
        raise _fail(cls, "EXTRA_INPUTS needs run(self, ctx, ..., **extra) to receive them")
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
