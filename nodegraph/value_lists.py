"""List outputs and list inputs: ComfyUI's OUTPUT_IS_LIST and INPUT_IS_LIST (execution.py
`_map_node_over_list`, `merge_result_data`).

An output declared `Output(T, is_list=True)` carries a `ValueList` of T values (the node returns a
Python list for it). A node that reads a `ValueList` on any link runs once per item: call i takes
item i of each list (the last item of a shorter one) and every other input as it is, and each of its
outputs becomes the `ValueList` of what the calls returned (an is_list output's lists are joined);
what the calls showed (`ui`) is joined key by key. A node with `INPUT_IS_LIST` instead runs once and
gets every input as a list: a list link's items, anything else as a one-item list. A node that ran
once, on no list, keeps plain values, so nothing changes for graphs without list outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodegraph.node import Node


@dataclass(frozen=True)
class ValueList:
    """The value of a list output: one item per batch, per file ... (never itself a node's input)."""

    items: tuple[Any, ...]


class ListInputError(ValueError):
    """A node was given an empty list to run over."""


Outputs = tuple[tuple[Any, ...], Mapping[str, Any] | None]  # (outputs, ui) of one call or one node


def run_over_lists(
    cls: type[Node], inputs: Mapping[str, Any], call: Callable[[dict[str, Any]], Outputs]
) -> Outputs:
    """`call` once, or once per list item (see the module docstring); the node's (outputs, ui)."""
    mapped = not cls.INPUT_IS_LIST and any(isinstance(v, ValueList) for v in inputs.values())
    return merge(cls, [call(kwargs) for kwargs in calls(cls, inputs)], mapped)


def calls(cls: type[Node], inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The keyword arguments of each call of `cls.run` for these resolved inputs."""
    if cls.INPUT_IS_LIST:
        return [{k: list(v.items) if isinstance(v, ValueList) else [v] for k, v in inputs.items()}]
    lists = {k: v.items for k, v in inputs.items() if isinstance(v, ValueList)}
    if not lists:
        return [dict(inputs)]
    empty = sorted(k for k, items in lists.items() if not items)
    if empty:
        raise ListInputError(
            f"{cls.NODE_ID}: input {', '.join(empty)} is an empty list; there is nothing to run on"
        )
    count = max(len(items) for items in lists.values())
    return [
        {k: (lists[k][min(i, len(lists[k]) - 1)] if k in lists else v) for k, v in inputs.items()}
        for i in range(count)
    ]


def merge(cls: type[Node], results: Sequence[Outputs], mapped: bool) -> Outputs:
    """(outputs, ui) of a node from the (outputs, ui) of each of its calls (`mapped`: it ran per item)."""
    outputs: list[Any] = []
    for slot, out in enumerate(cls.OUTPUTS):
        values = [result[0][slot] for result in results]
        if out.is_list:
            outputs.append(ValueList(tuple(item for value in values for item in _as_items(cls, value))))
        elif mapped:
            outputs.append(ValueList(tuple(values)))
        else:
            outputs.append(values[0])
    uis = [result[1] for result in results if result[1] is not None]
    if not uis:
        return tuple(outputs), None
    if len(uis) == 1:
        return tuple(outputs), uis[0]
    joined: dict[str, list[Any]] = {}
    for ui in uis:
        for key, value in ui.items():
            joined.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return tuple(outputs), joined


def _as_items(cls: type[Node], value: Any) -> Sequence[Any]:
    if isinstance(value, ValueList):
        return value.items
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{cls.NODE_ID}.run must return a list for its list output, got {type(value).__name__}"
        )
    return value
