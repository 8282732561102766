"""Subgraphs in UI workflows: flattened into plain nodes before the UI -> API conversion.

The canvas (frontend 1.24+) can turn a group of nodes into a subgraph: the workflow then holds
`definitions.subgraphs` (each with its own nodes and links, and links from or to the special
input node -10 and output node -20) and instances whose `type` is the subgraph's id. The frontend
runs the inner nodes under ids `"<instance id>:<inner id>"` (nested: `"a:b:c"`); this module does
the same, rewiring links across the boundary, so the rest of the conversion sees one flat graph.
A subgraph input shown as a widget on the instance (a promoted widget) becomes a PrimitiveNode.
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Any

SUBGRAPH_INPUT_ID = -10
SUBGRAPH_OUTPUT_ID = -20
MUTED = 2
MAX_DEPTH = 32
# Work budget of one workflow (D2: a 460-byte definition holding itself twice doubled at every
# level and hung the server). Counted before expanding anything; the clock guards what is left.
MAX_EXPANDED_NODES = 10_000
MAX_EXPAND_SECONDS = 10.0


class SubgraphError(ValueError):
    """A subgraph definition or instance is inconsistent (graph.py turns it into a WorkflowError)."""


def flatten_subgraphs(workflow: dict[str, Any]) -> dict[str, Any]:
    """The workflow with every subgraph instance replaced by its inner nodes; unchanged if it has none."""
    definitions = {str(d.get("id")): d for d in _definitions(workflow)}
    if not definitions or not any(str(n.get("type")) in definitions for n in workflow.get("nodes") or []):
        return workflow
    expanded_size(workflow.get("nodes") or [], definitions)
    deadline = time.monotonic() + MAX_EXPAND_SECONDS
    flat = copy.deepcopy(workflow)
    flat["links"] = [_as_array(link) for link in flat.get("links") or []]
    counter = itertools.count(max((link[0] for link in flat["links"]), default=0) + 1)
    for _ in range(MAX_DEPTH):
        instances = [n for n in flat["nodes"] if str(n.get("type")) in definitions and n.get("mode") != 4]
        if not instances:
            return flat
        for instance in instances:
            if time.monotonic() > deadline:
                raise SubgraphError(f"expanding the subgraphs took over {MAX_EXPAND_SECONDS:g} s")
            _expand(flat, instance, definitions[str(instance["type"])], counter)
    raise SubgraphError(f"subgraphs nest deeper than {MAX_DEPTH} levels (a subgraph contains itself?)")


def expanded_size(nodes: list[Any], definitions: dict[str, dict[str, Any]]) -> int:
    """How many nodes `nodes` become once every subgraph is expanded; raises SubgraphError if a
    subgraph contains itself (by id, at any depth) or the count passes MAX_EXPANDED_NODES."""
    sizes: dict[str, int] = {}

    def size_of(def_id: str, path: tuple[str, ...]) -> int:
        if def_id in path:
            chain = " -> ".join((*path[path.index(def_id) :], def_id))
            raise SubgraphError(f"subgraph {def_id} contains itself ({chain})")
        if len(path) >= MAX_DEPTH:
            raise SubgraphError(f"subgraphs nest deeper than {MAX_DEPTH} levels")
        if def_id not in sizes:
            sizes[def_id] = count(definitions[def_id].get("nodes") or [], (*path, def_id))
        return sizes[def_id]

    def count(inner: list[Any], path: tuple[str, ...]) -> int:
        total = 0
        for node in inner:
            kind = str(node.get("type")) if isinstance(node, dict) else ""
            total += size_of(kind, path) if kind in definitions and node.get("mode") != 4 else 1
            if total > MAX_EXPANDED_NODES:
                raise SubgraphError(
                    f"the workflow expands to more than {MAX_EXPANDED_NODES:,} nodes; split it up"
                )
        return total

    return count(nodes, ())


def _definitions(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    definitions = workflow.get("definitions")
    found = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    return [d for d in found or [] if isinstance(d, dict)]


def _as_array(link: Any) -> list[Any]:
    """A link as a schema 0.4 array [id, origin, origin_slot, target, target_slot, type]."""
    if isinstance(link, dict):
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        return [link.get(k) for k in keys]
    return list(link)


def _expand(flat: dict[str, Any], instance: dict[str, Any], definition: dict[str, Any], counter: Any) -> None:
    """Replace one instance by its inner nodes, rewiring the links that cross its boundary."""
    sid = str(instance["id"])
    links_by_id = {link[0]: link for link in flat["links"]}
    inner_nodes = {str(n["id"]): copy.deepcopy(n) for n in definition.get("nodes") or []}
    for node in inner_nodes.values():
        node["id"] = f"{sid}:{node['id']}"
        for inp in node.get("inputs") or []:
            inp["link"] = None  # every inner link is re-made below, under a fresh id
        if instance.get("mode") == MUTED:
            node["mode"] = MUTED  # a muted subgraph mutes everything inside it
    new_links: list[list[Any]] = []
    promoted = _promoted_values(instance)
    for raw in definition.get("links") or []:
        link_id, origin, oslot, target, tslot, ltype = _as_array(raw)[:6]
        if str(target) == str(SUBGRAPH_OUTPUT_ID):
            continue  # handled below, from the consumers' side
        consumer = inner_nodes.get(str(target))
        if consumer is None:
            raise SubgraphError(
                f"subgraph {definition.get('id')}: link {link_id} targets missing node {target}"
            )
        if str(origin) == str(SUBGRAPH_INPUT_ID):
            source = _boundary_source(flat, instance, links_by_id, int(oslot), promoted)
        else:
            source = (f"{sid}:{origin}", int(oslot))
        _connect(consumer, int(tslot), source, ltype, new_links, counter)
    _rewire_consumers(flat, instance, definition, links_by_id)
    boundary = {link[0] for link in flat["links"] if str(link[3]) == sid}
    flat["links"] = [link for link in flat["links"] if link[0] not in boundary] + new_links
    flat["nodes"] = [n for n in flat["nodes"] if n is not instance] + list(inner_nodes.values())


def _boundary_source(
    flat: dict[str, Any],
    instance: dict[str, Any],
    links_by_id: dict[Any, list[Any]],
    slot: int,
    promoted: dict[int, Any],
) -> tuple[str, int] | None:
    """What feeds the instance's input `slot` from outside: a link's origin, a promoted value, or nothing."""
    inputs = instance.get("inputs") or []
    link_id = inputs[slot].get("link") if slot < len(inputs) else None
    if link_id is not None and link_id in links_by_id:
        outer = links_by_id[link_id]
        return str(outer[1]), int(outer[2])
    if slot not in promoted:
        return None
    primitive_id = f"{instance['id']}:input{slot}"
    if not any(str(n["id"]) == primitive_id for n in flat["nodes"]):
        flat["nodes"].append(
            {"id": primitive_id, "type": "PrimitiveNode", "mode": 0, "inputs": [], "outputs": [],
             "widgets_values": [promoted[slot]]}
        )  # fmt: skip
    return primitive_id, 0


def _promoted_values(instance: dict[str, Any]) -> dict[int, Any]:
    """Input slot -> value of the instance's promoted widgets (positional over inputs that have one)."""
    values = instance.get("widgets_values")
    if not isinstance(values, list):
        return {}
    slots = [i for i, inp in enumerate(instance.get("inputs") or []) if inp.get("widget")]
    return dict(zip(slots, values, strict=False))


def _connect(
    consumer: dict[str, Any],
    slot: int,
    source: tuple[str, int] | None,
    ltype: Any,
    new_links: list[list[Any]],
    counter: Any,
) -> None:
    inputs = consumer.get("inputs") or []
    if slot >= len(inputs):
        raise SubgraphError(f"node {consumer['id']} has no input slot {slot}")
    if source is None:
        inputs[slot]["link"] = None
        return
    link_id = next(counter)
    new_links.append([link_id, source[0], source[1], consumer["id"], slot, ltype])
    inputs[slot]["link"] = link_id


def _rewire_consumers(
    flat: dict[str, Any],
    instance: dict[str, Any],
    definition: dict[str, Any],
    links_by_id: dict[Any, list[Any]],
) -> None:
    """Links from the instance's outputs now start at the inner node that feeds each subgraph output."""
    sid = str(instance["id"])
    feeds: dict[int, tuple[str, int]] = {}
    for raw in definition.get("links") or []:
        _id, origin, oslot, target, tslot = _as_array(raw)[:5]
        if str(target) == str(SUBGRAPH_OUTPUT_ID) and str(origin) != str(SUBGRAPH_INPUT_ID):
            feeds[int(tslot)] = (f"{sid}:{origin}", int(oslot))
    for link in flat["links"]:
        if str(link[1]) != sid:
            continue
        feed = feeds.get(int(link[2]))
        if feed is None:
            link[1], link[2] = f"{sid}:missing", 0  # an output with nothing inside: the consumer gets no link
        else:
            link[1], link[2] = feed
