"""The output cache: node outputs keyed by an input signature, bounded by entries and by bytes.

A node's signature is a digest of its class, its fingerprint (ComfyUI's IS_CHANGED), its constant
inputs and the keys of the outputs its links read. An output's key is its node's signature, or,
when the output declares `depends_on`, a digest of only those inputs: LoraLoader's CLIP output
keeps its key when `strength_model` changes, so the text encoders downstream stay cached. Node
ids are not part of either, so the same subgraph in another workflow (or under other ids) hits
the cache; a changed widget changes that node and what depends on the outputs it changes, and
nothing else. Non-idempotent nodes and nodes that read their own id add the id, so they are
never shared between nodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from nodegraph.env import Environment
from nodegraph.node import FileChoice, Hidden, ImageUpload, Node, Output
from nodegraph.primitives import LruCache
from nodegraph.prompt_graph import PromptGraph, PromptNode
from nodegraph.types import UNIQUE_ID
from nodegraph.validate import call_with_constants

log = logging.getLogger(__name__)

_SCALARS = (str, bytes, int, float, bool)


@dataclass(frozen=True)
class CacheEntry:
    """One node's outputs (one value per output socket) and the UI dict it showed."""

    outputs: tuple[Any, ...]
    ui: Mapping[str, Any] | None
    nbytes: int


class OutputCache(LruCache[str, CacheEntry]):
    """An LRU map from signature to `CacheEntry`, bounded by entry count and estimated bytes.

    Entries pinned for the running prompt are never evicted, so a node found cached when the
    prompt started is still there when a consumer needs it. Thread-safe.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        super().__init__(max_entries, max_bytes, size=lambda entry: entry.nbytes)


def estimate_nbytes(value: Any, depth: int = 0, seen: set[int] | None = None) -> int:
    """Bytes held by arrays found in a value (anything with an integer `.nbytes`: tensors, ndarrays).

    Walks dicts, lists, tuples and dataclasses a few levels deep; objects seen twice count once.
    Models are not counted: the model store owns and bounds them.
    """
    if value is None or isinstance(value, _SCALARS):
        return 0
    seen = set() if seen is None else seen
    if depth > 6 or id(value) in seen:
        return 0
    seen.add(id(value))
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, Mapping):
        return sum(estimate_nbytes(v, depth + 1, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        total = 0
        for item in value:  # a plain loop: this runs for every node output, most of them tiny
            if item is not None and not isinstance(item, _SCALARS):
                total += estimate_nbytes(item, depth + 1, seen)
        return total
    if is_dataclass(value) and not isinstance(value, type):
        return sum(estimate_nbytes(getattr(value, f.name, None), depth + 1, seen) for f in fields(value))
    return 0


_CLASS_FLAGS: dict[type[Node], tuple[bool, bool]] = {}


def _class_flags(cls: type[Node]) -> tuple[bool, bool]:
    """(reads its own id, has a fingerprint), computed once per class: this runs for every node."""
    flags = _CLASS_FLAGS.get(cls)
    if flags is None:
        own_id = any(isinstance(inp, Hidden) and inp.kind == UNIQUE_ID for inp in cls.INPUTS)
        fingerprinted = cls.fingerprint.__func__ is not Node.fingerprint.__func__  # type: ignore[attr-defined]
        flags = _CLASS_FLAGS[cls] = (own_id, fingerprinted or bool(file_inputs(cls)))
    return flags


def file_inputs(cls: type[Node]) -> list[FileChoice | ImageUpload]:
    """The node's file-backed inputs: the engine fingerprints and checks those itself."""
    return [inp for inp in cls.INPUTS if isinstance(inp, (FileChoice, ImageUpload))]


def _fingerprint(cls: type[Node], env: Environment, constants: Mapping[str, Any]) -> Any:
    files = tuple(inp.fingerprint(env, constants.get(inp.name)) for inp in file_inputs(cls))
    if cls.fingerprint.__func__ is Node.fingerprint.__func__:  # type: ignore[attr-defined]
        return files
    own = call_with_constants(cls.fingerprint, env, constants)
    return (files, own) if files else own


def fingerprint_of(cls: type[Node], env: Environment, node_id: str, constants: Mapping[str, Any]) -> str:
    """The node's fingerprint as text: its file inputs' stamps and its own `fingerprint`. NaN or a
    failing fingerprint gives a one-off value (always re-run)."""
    if not _class_flags(cls)[1]:
        return ""
    try:
        value = _fingerprint(cls, env, constants)
    except Exception:  # ComfyUI treats a failing IS_CHANGED as "changed"; the node itself will report
        log.warning("fingerprint of node %s (%s) failed; it will run", node_id, cls.NODE_ID, exc_info=True)
        return uuid.uuid4().hex
    if isinstance(value, float) and math.isnan(value):
        return uuid.uuid4().hex
    return repr(value)


@dataclass(frozen=True)
class NodeKeys:
    """A node's cache keys: `node` finds its own cache entry, `outputs[i]` is what a consumer of
    output i puts in its signature (`node` and the slot, unless the output declares `depends_on`)."""

    node: str
    outputs: tuple[str, ...]


def _digest(parts: list[Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def node_keys(graph: PromptGraph, env: Environment) -> dict[str, NodeKeys]:
    """The cache keys of every node in `graph.order` (sources before their consumers).

    Args:
        graph: the parsed prompt (`Validation.graph`).
        env: passed to the nodes' fingerprints.
    """
    keys: dict[str, NodeKeys] = {}
    for node_id in graph.order:
        node = graph.nodes[node_id]
        cls = node.cls
        own: list[Any] = [cls.NODE_ID, fingerprint_of(cls, env, node_id, node.constants)]
        if cls.NOT_IDEMPOTENT or _class_flags(cls)[0]:
            own.append(node_id)
        values: dict[str, Any] = dict(node.constants)
        for name, link in node.links.items():
            values[name] = ["link", keys[link.source].outputs[link.slot]]
        signature = _digest([*own, *([name, values[name]] for name in sorted(values))])
        outputs = tuple(
            f"{signature}/{slot}"
            if out.depends_on is None
            else _digest([*own, "output", slot, *_parts(out, node, values)])
            for slot, out in enumerate(cls.OUTPUTS)
        )
        keys[node_id] = NodeKeys(signature, outputs)
    return keys


def _parts(out: Output, node: PromptNode, values: Mapping[str, Any]) -> list[Any]:
    """The key parts of one output with `depends_on`: each input it names, or f(value) for (name, f)."""
    parts: list[Any] = []
    for entry in out.depends_on or ():
        name, derive = (entry, None) if isinstance(entry, str) else entry
        value = values.get(name)
        if derive is not None and name in node.constants:
            try:
                value = ["derived", derive(value)]
            except Exception:  # a derivation that fails counts the whole value: never a wrong hit
                log.warning("depends_on of %s.%s failed", node.cls.NODE_ID, name, exc_info=True)
        parts.append([name, value])
    return parts


def node_signatures(graph: PromptGraph, env: Environment) -> dict[str, str]:
    """The signature of every node of `graph` (the key of its own cache entry)."""
    return {node_id: keys.node for node_id, keys in node_keys(graph, env).items()}
