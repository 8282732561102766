"""Every node's `run` is annotated with its sockets' value types (`nodes/value_types.py`).

A socket input's parameter has its socket's value type (`T | None` when it may be absent: an
optional input, a hidden one, a parameter defaulting to None); `run` returns a tuple of its
outputs' value types (`T | None` only where an absent optional input of that type passes through),
or a `Result` from an output node. mypy then checks each link's two ends
against one type. Inputs a node takes through `**kwargs` (the LoRA stackers' numbered slots) have
no parameter to check; they are listed by the last test.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pytest

from nodegraph.inputs import Hidden, Input, Socket
from nodegraph.node import Node, Result
from nodegraph.types import SocketType
from nodes import all_nodes
from nodes.value_types import HIDDEN_VALUE_TYPES, VALUE_TYPES

NODES = {cls.NODE_ID: cls for cls in all_nodes()}


def _expected(inp: Input, as_list: bool = False) -> Any:
    """The value type; `as_list`: a node with INPUT_IS_LIST gets every input as a list of it."""
    if isinstance(inp, Hidden):
        want = HIDDEN_VALUE_TYPES[inp.kind]
    else:
        want = VALUE_TYPES[inp.socket_type if isinstance(inp, Socket) else inp.type]
    return list[want] if as_list else want  # type: ignore[valid-type]


def _hints(cls: type[Node]) -> dict[str, Any]:
    return typing.get_type_hints(cls.run)


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_run_parameters_have_their_sockets_value_types(node_id: str) -> None:
    cls = NODES[node_id]
    hints, params = _hints(cls), inspect.signature(cls.run).parameters
    wrong = []
    for inp in cls.INPUTS:
        param = params.get(inp.name)
        if param is None:
            continue  # taken through **kwargs
        want = _expected(inp, cls.INPUT_IS_LIST)
        if param.default is None or inp.optional or isinstance(inp, Hidden):
            allowed = (want, want | None)
        else:
            allowed = (want,)
        if hints.get(inp.name) not in allowed:
            wrong.append(f"{inp.name}: {hints.get(inp.name)} (want {want})")
    assert not wrong, f"{node_id}.run: " + "; ".join(wrong)


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_run_returns_its_outputs_value_types(node_id: str) -> None:
    cls = NODES[node_id]
    returned = _hints(cls)["return"]
    if returned is Result:
        assert cls.OUTPUT_NODE, f"{node_id}: only an output node returns a Result"
        return
    assert typing.get_origin(returned) is tuple, f"{node_id}.run returns {returned}, not a tuple"
    # An output may be None only where the node passes an absent optional input of its type through.
    optional = {inp.socket_type for inp in cls.INPUTS if isinstance(inp, Socket) and inp.optional}
    got, outputs = typing.get_args(returned), cls.OUTPUTS
    assert len(got) == len(outputs), f"{node_id}.run returns {returned} for {len(outputs)} outputs"
    for hint, out in zip(got, outputs, strict=True):
        want = list[VALUE_TYPES[out.type]] if out.is_list else VALUE_TYPES[out.type]  # a list output: a list
        allowed = (want, want | None) if out.type in optional else (want,)
        assert hint in allowed, f"{node_id}.run returns {hint} for output {out.type.name}, want {want}"


def test_every_socket_type_has_a_value_type() -> None:
    used: set[SocketType] = set()
    for cls in NODES.values():
        used |= {out.type for out in cls.OUTPUTS}
        used |= {inp.socket_type for inp in cls.INPUTS if isinstance(inp, Socket)}
    assert used <= set(VALUE_TYPES), sorted(t.name for t in used - set(VALUE_TYPES))


def test_only_the_stackers_and_block_mergers_take_inputs_through_kwargs() -> None:
    takes_kwargs = {
        node_id
        for node_id, cls in NODES.items()
        if any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls.run).parameters.values()
        )
    }
    assert takes_kwargs == {
        "Power Lora Loader (rgthree)",
        "Lora Loader Stack (rgthree)",
        "LoRA Stacker",
        "CR LoRA Stack",
        "TrainLora",
        "ModelMergeSD1",  # ComfyUI's dotted input names (`input_blocks.0.`) are no parameter names
        "ModelMergeSDXL",
    }
