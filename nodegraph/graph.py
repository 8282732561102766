"""Loading workflows: ComfyUI's API format, its UI (canvas) format and PNG files that carry either.

Every way in ends as an API-format prompt, `{node_id: {"class_type", "inputs", "_meta"}}`, where a
linked input is `[source_id, output_index]`. The UI format is converted here, server-side, the way
ComfyUI's frontend converts it when it queues (`graphToPrompt`), so a file saved from the canvas
and the same graph exported "for API" give the same prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nodegraph.dynamic_prompts import dynamic_prompt
from nodegraph.node import Combo, Input, Int, Node, String
from nodegraph.node_packs import describe_missing
from nodegraph.png_text import PNG_SIGNATURE, png_text_chunks
from nodegraph.registry import Registry
from nodegraph.subgraphs import MAX_EXPANDED_NODES, SubgraphError, flatten_subgraphs

__all__ = ["LoadedWorkflow", "WorkflowError", "load_workflow", "png_text_chunks", "ui_to_api"]

MUTED, BYPASS = 2, 4
# Canvas-only nodes: they never reach the API prompt (ComfyUI's "virtual" nodes).
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE, PRIMITIVE = "Reroute", "PrimitiveNode"
# Node types the frontend renames as it loads a canvas file (`loadGraphData` in ComfyUI_frontend's
# app.ts), so a file saved before the rename still opens and queues under the new name.
RENAMED_TYPES = {
    "T2IAdapterLoader": "ControlNetLoader",  # the two loaders became one node
    "ConditioningAverage ": "ConditioningAverage",  # the id had a trailing space until September 2023
    "SDV_img2vid_Conditioning": "SVD_img2vid_Conditioning",
    "Load3DAnimation": "Load3D",
    "Preview3DAnimation": "Preview3D",
}


class WorkflowError(ValueError):
    """A workflow file or object is malformed; the message names the node, link or input."""


@dataclass
class LoadedWorkflow:
    """A workflow ready for validation: the API prompt, the UI workflow if any, and where it came from."""

    prompt: dict[str, Any]
    workflow: dict[str, Any] | None
    format: Literal["api", "ui", "png"]


def load_workflow(source: dict[str, Any] | str | bytes | Path, registry: Registry) -> LoadedWorkflow:
    """Read a workflow in any of ComfyUI's formats and return its API prompt.

    Args:
        source: an API or UI workflow dict, JSON text, a path to a .json or .png file, or file bytes.
            A str that is not JSON text is read as a file path: give untrusted input (a request
            body) as a dict or bytes, never as a str.
        registry: the node classes, needed to map a UI node's widget values onto input names.

    Raises:
        WorkflowError: the source is unreadable or not a workflow.
    """
    if isinstance(source, dict):
        return _from_object(source, registry, origin="the workflow")
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WorkflowError(f"cannot read workflow file {path}: {exc.strerror or exc}") from exc
        return _from_bytes(data, registry, origin=str(path))
    if isinstance(source, str):
        return _from_bytes(source.encode("utf-8"), registry, origin="the workflow text")
    if isinstance(source, (bytes, bytearray)):
        return _from_bytes(bytes(source), registry, origin="the workflow data")
    raise WorkflowError(f"cannot load a workflow from a {type(source).__name__}")


def _from_bytes(data: bytes, registry: Registry, origin: str) -> LoadedWorkflow:
    if data.startswith(PNG_SIGNATURE):
        return _from_png(data, registry, origin)
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise WorkflowError(f"{origin} is neither JSON text nor a PNG image") from exc
    except json.JSONDecodeError as exc:
        raise WorkflowError(
            f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    if not isinstance(obj, dict):
        raise WorkflowError(f"{origin} must hold a JSON object, not a {type(obj).__name__}")
    return _from_object(obj, registry, origin)


def _from_png(data: bytes, registry: Registry, origin: str) -> LoadedWorkflow:
    texts = png_text_chunks(data)
    workflow = _json_chunk(texts, "workflow", origin)
    # The workflow first, as ComfyUI's canvas does when an image is dropped on it: it is what the
    # user sees and edits, while an old image's prompt chunk can be stale (written by an older
    # frontend, or before a node's widgets changed). The prompt only when there is no workflow.
    if workflow is not None and isinstance(workflow.get("nodes"), list):
        return LoadedWorkflow(ui_to_api(workflow, registry), workflow, "png")
    prompt = _json_chunk(texts, "prompt", origin)
    if prompt is not None:
        return LoadedWorkflow(_api_copy(prompt, origin), workflow, "png")
    raise WorkflowError(
        f"{origin} is a PNG without a 'prompt' or 'workflow' text chunk; save it with metadata"
    )


def _json_chunk(texts: dict[str, str], key: str, origin: str) -> dict[str, Any] | None:
    if key not in texts:
        return None
    try:
        value = json.loads(texts[key])
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"{origin}: the PNG '{key}' chunk is not valid JSON ({exc.msg})") from exc
    return value if isinstance(value, dict) else None


def _from_object(obj: dict[str, Any], registry: Registry, origin: str) -> LoadedWorkflow:
    if isinstance(obj.get("nodes"), list):
        return LoadedWorkflow(ui_to_api(obj, registry), obj, "ui")
    # A /prompt request body or a history entry wraps the API prompt.
    if isinstance(obj.get("prompt"), dict) and "class_type" not in obj["prompt"]:
        workflow = (obj.get("extra_data") or {}).get("extra_pnginfo", {}).get("workflow")
        return LoadedWorkflow(_api_copy(obj["prompt"], origin), workflow, "api")
    return LoadedWorkflow(_api_copy(obj, origin), None, "api")


def _api_copy(prompt: dict[str, Any], origin: str) -> dict[str, Any]:
    """A copy of an API prompt, checked for shape (names the node that is not a node object)."""
    if not prompt:
        raise WorkflowError(f"{origin} has no nodes")
    if len(prompt) > MAX_EXPANDED_NODES:
        raise WorkflowError(f"{origin} has {len(prompt):,} nodes, over {MAX_EXPANDED_NODES:,}")
    out: dict[str, Any] = {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise WorkflowError(
                f"{origin}: node '{node_id}' is a {type(node).__name__}, "
                "not an object with class_type and inputs"
            )
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise WorkflowError(f"{origin}: node '{node_id}' has 'inputs' that is not an object")
        out[str(node_id)] = {**node, "inputs": dict(inputs)}
    return out


# --------------------------------------------------------------------------------------------
# UI format -> API format


@dataclass(frozen=True)
class _Link:
    origin_id: str
    origin_slot: int
    type: str


@dataclass(frozen=True)
class _Value:
    """An input filled by a PrimitiveNode's widget rather than by a link."""

    value: Any


def ui_to_api(workflow: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """Convert a UI (canvas) workflow to an API prompt, as the frontend's `graphToPrompt` does.

    Args:
        workflow: a schema 0.4 (array links) or schema 1 (object links) workflow.
        registry: node classes, to map `widgets_values` onto input names.

    Raises:
        WorkflowError: a node, link or widget list is malformed, or a node type is unknown.
    """
    nodes = workflow.get("nodes")
    if not isinstance(nodes, list):
        raise WorkflowError("the UI workflow has no 'nodes' list")
    if len(nodes) > MAX_EXPANDED_NODES:
        raise WorkflowError(f"the UI workflow has {len(nodes):,} nodes, over {MAX_EXPANDED_NODES:,}")
    for node in nodes:
        if not isinstance(node, dict) or "id" not in node or "type" not in node:
            raise WorkflowError(f"the UI workflow has a node without 'id' and 'type': {str(node)[:80]}")
    try:
        workflow = flatten_subgraphs(workflow)
    except (SubgraphError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise WorkflowError(f"the UI workflow's subgraphs are malformed: {exc}") from exc
    by_id = {str(node["id"]): _current_type(node) for node in workflow["nodes"]}
    links = _parse_links(workflow.get("links") or [])
    resolver = _Resolver(by_id, links)
    active = {
        node_id: node
        for node_id, node in by_id.items()
        if node["type"] not in NOTE_TYPES
        and node["type"] not in (REROUTE, PRIMITIVE)
        and node.get("mode") not in (MUTED, BYPASS)
    }
    _check_known(active, registry)
    prompt: dict[str, Any] = {}
    for node_id, node in active.items():
        class_type = node["type"]
        cls = registry.get(class_type)
        assert cls is not None  # _check_known
        try:
            prompt[node_id] = _convert_node(node_id, node, cls, resolver)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            if isinstance(exc, WorkflowError):
                raise
            raise WorkflowError(
                f"node {node_id} ({class_type}) is malformed in the UI workflow: {exc!r}"
            ) from exc
    return prompt


def _current_type(node: dict[str, Any]) -> dict[str, Any]:
    """The node under its current type name (a copy when renamed: the caller's workflow stays as read)."""
    renamed = RENAMED_TYPES.get(str(node["type"]))
    return node if renamed is None else {**node, "type": renamed}


def _check_known(nodes: dict[str, dict[str, Any]], registry: Registry) -> None:
    """Every node type the workflow needs and nodegraph lacks, in one error, each with its pack."""
    missing: dict[str, list[str]] = {}
    for node_id, node in nodes.items():
        if str(node["type"]) not in registry:
            missing.setdefault(str(node["type"]), []).append(node_id)
    if not missing:
        return
    where = ", ".join(f"{t} at node {'/'.join(ids)}" for t, ids in missing.items())
    raise WorkflowError(
        f"the workflow needs {len(missing)} node type(s) nodegraph does not have: "
        f"{describe_missing(missing)}. Replace or remove them, or mute them in the canvas ({where}); "
        "`nodegraph nodes` lists the node types nodegraph has"
    )


def _parse_links(raw: list[Any]) -> dict[int, _LinkRecord]:
    links: dict[int, _LinkRecord] = {}
    for item in raw:
        if isinstance(item, list) and len(item) >= 5:
            link_id, origin, oslot, target, tslot = item[:5]
            ltype = item[5] if len(item) > 5 else "*"
        elif isinstance(item, dict) and "id" in item:
            link_id, origin, oslot = item["id"], item.get("origin_id"), item.get("origin_slot")
            target, tslot, ltype = item.get("target_id"), item.get("target_slot"), item.get("type", "*")
        else:
            raise WorkflowError(f"the UI workflow has a malformed link: {str(item)[:80]}")
        try:
            links[int(link_id)] = _LinkRecord(str(origin), int(oslot), str(target), int(tslot), str(ltype))
        except (TypeError, ValueError) as exc:
            raise WorkflowError(f"the UI workflow has a malformed link {str(item)[:80]}: {exc}") from exc
    return links


@dataclass(frozen=True)
class _LinkRecord:
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: str


class _Resolver:
    """Follows a link through Reroutes and bypassed nodes to the node output (or Primitive) behind it."""

    def __init__(self, nodes: dict[str, dict[str, Any]], links: dict[int, _LinkRecord]) -> None:
        self.nodes = nodes
        self.links = links

    def input_link(self, node: dict[str, Any], slot: int, want: str) -> _Link | _Value | None:
        inputs = node.get("inputs") or []
        if slot < 0 or slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        return self.follow(int(inputs[slot]["link"]), want, set())

    def follow(self, link_id: int, want: str, seen: set[str]) -> _Link | _Value | None:
        link = self.links.get(link_id)
        if link is None:
            return None  # a dangling link id: the frontend drops it too
        origin = self.nodes.get(link.origin_id)
        key = f"{link.origin_id}:{link.origin_slot}"
        if origin is None or key in seen:
            return None
        seen.add(key)
        kind, mode = origin["type"], origin.get("mode", 0)
        if kind == PRIMITIVE:
            values = origin.get("widgets_values") or []
            return _Value(values[0]) if values else None
        if kind == REROUTE:
            return self._through(origin, 0, want, seen)
        if mode == MUTED:
            return None  # a muted node's outputs vanish; its consumers see no link
        if mode == BYPASS:
            slot = _bypass_slot(origin, link.origin_slot, want)
            return None if slot < 0 else self._through(origin, slot, want, seen)
        return _Link(link.origin_id, link.origin_slot, link.type)

    def _through(self, node: dict[str, Any], slot: int, want: str, seen: set[str]) -> _Link | _Value | None:
        inputs = node.get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        return self.follow(int(inputs[slot]["link"]), want, seen)


def _bypass_slot(node: dict[str, Any], slot: int, want: str) -> int:
    """The input a bypassed node passes to output `slot`: the same index if its type fits, else the first
    input of the wanted type (the frontend's `getBypassSlotIndex`)."""
    inputs = node.get("inputs") or []
    outputs = node.get("outputs") or []
    out_type = outputs[slot].get("type") if slot < len(outputs) else want
    if slot < len(inputs) and inputs[slot].get("type") in (out_type, want, "*"):
        return slot
    for index, inp in enumerate(inputs):
        if inp.get("type") == want:
            return index
    return -1


def _widget_values(node_id: str, node: dict[str, Any], cls: type[Node]) -> dict[str, Any]:
    """Map `widgets_values` onto the node's widget inputs (positional, with the frontend's extra widgets)."""
    raw = node.get("widgets_values")
    if isinstance(raw, list):
        own = cls.from_ui_widgets(raw, node.get("properties") or {})
        if own is not None:
            return own
    widgets = [inp for inp in cls.INPUTS if inp.is_widget]
    if isinstance(raw, dict):
        return {inp.name: raw[inp.name] for inp in widgets if inp.name in raw}
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise WorkflowError(f"node {node_id} ({cls.NODE_ID}): widgets_values must be a list or an object")
    values: dict[str, Any] = {}
    pos = 0
    # The frontend's Comfy.UploadImage extension appends the upload button as the *last required*
    # input (`required.upload = ...`), so its value sits after every required widget.
    uploads = 0
    for inp in _in_input_order(widgets):
        if inp.optional:
            pos, uploads = pos + uploads, 0
        value = raw[pos] if pos < len(raw) else inp.default_value()
        if value is not None:  # a widget the file predates and with no default: validation reports it
            values[inp.name] = value
        pos += 1 + _extra_widgets(inp)
        uploads += isinstance(inp, Combo) and inp.image_upload
    return values


def _in_input_order(widgets: list[Input]) -> list[Input]:
    return [w for w in widgets if not w.optional] + [w for w in widgets if w.optional]


def _extra_widgets(inp: Input) -> int:
    """Frontend-only widgets that follow an input's widget in `widgets_values`."""
    if isinstance(inp, Int) and inp.control_after_generate:
        return 1  # the "control_after_generate" combo: fixed / increment / decrement / randomize
    return 0


def _convert_node(node_id: str, node: dict[str, Any], cls: type[Node], resolver: _Resolver) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for name, value in _widget_values(node_id, node, cls).items():
        inputs[name] = _serialized(cls.input(name), value)
    for slot, ui_input in enumerate(node.get("inputs") or []):
        name = ui_input.get("name")
        declared = cls.input(name) if isinstance(name, str) else None
        if declared is None:
            continue  # a socket the node no longer declares; validation would not use it
        resolved = resolver.input_link(node, slot, declared.type.name)
        if isinstance(resolved, _Link):
            inputs[declared.name] = [resolved.origin_id, resolved.origin_slot]
        elif isinstance(resolved, _Value):
            inputs[declared.name] = _serialized(declared, resolved.value)
        elif not declared.is_widget:
            inputs.pop(declared.name, None)  # an unconnected socket: no value at all
    title = node.get("title") or cls.DISPLAY_NAME or cls.NODE_ID
    return {"inputs": inputs, "class_type": cls.NODE_ID, "_meta": {"title": title}}


def _serialized(inp: Input | None, value: Any) -> Any:
    """A widget value as the frontend puts it in the API prompt (its `serializeValue` hooks)."""
    if isinstance(value, list):
        return {"__value__": value}  # a list would read as a link
    if isinstance(inp, String) and inp.dynamic_prompts and isinstance(value, str):
        return dynamic_prompt(value)
    return value
