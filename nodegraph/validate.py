"""Validating an API prompt before it runs, with ComfyUI's error types and `node_errors` shape.

Validation walks back from each output node through its links. An output is valid when it and
every node it depends on pass; valid outputs run even when another output is invalid, as in
ComfyUI. Every error names the node, the input and what is wrong.
"""

from __future__ import annotations

import dataclasses
import inspect
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import networkx as nx

from nodegraph.env import Environment
from nodegraph.node import (
    Combo,
    FileChoice,
    Float,
    Hidden,
    ImageUpload,
    Input,
    InputValueError,
    Int,
    Node,
    Socket,
)
from nodegraph.node_packs import describe_missing
from nodegraph.prompt_graph import (
    WRAPPED,
    PromptGraph,
    PromptNode,
    dependency_graph,
    is_link,
    ordered,
    parse_node,
    unwrap,
)
from nodegraph.registry import Registry

BAD_LINK_MESSAGE = "Bad linked input, must be a length-2 list of [node_id, slot_index]"


@dataclass
class Validation:
    """The result of `validate_prompt`: the coerced prompt, the outputs that may run, and the errors.

    `graph` (when `ok`) is the parsed prompt the executor runs; `prompt` is the same prompt as
    ComfyUI's dict, for the queue, history and clients.
    """

    ok: bool
    prompt: dict[str, Any]
    outputs: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    node_errors: dict[str, Any] = field(default_factory=dict)
    graph: PromptGraph | None = None


def error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    """One ComfyUI error object."""
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def exception_error(exc: Exception) -> dict[str, Any]:
    """ComfyUI's `exception_during_validation` for an exception being handled (its traceback included)."""
    return error(
        "exception_during_validation",
        "Exception when validating node",
        f"{type(exc).__name__}: {exc}",
        exception_type=qualified_name(type(exc)),
        traceback=traceback.format_exc().splitlines(),
    )


def validate_prompt(
    prompt: Any, registry: Registry, env: Environment, partial_targets: list[str] | None = None
) -> Validation:
    """Check a prompt as ComfyUI's `validate_prompt` does and return a coerced copy.

    Args:
        prompt: an API-format prompt `{node_id: {"class_type", "inputs"}}`.
        registry: the node classes.
        env: the environment (folders for file choices).
        partial_targets: when given, only these output nodes are run (ComfyUI's partial execution).
    """
    if not isinstance(prompt, dict) or not prompt:
        return _fail(
            prompt, error("invalid_prompt", "Cannot execute because the prompt is empty or not an object")
        )
    problem = _check_classes(prompt, registry)
    if problem is not None:
        return _fail(prompt, problem)
    coerced = {str(k): {**v, "inputs": dict(v.get("inputs") or {})} for k, v in prompt.items()}
    targets = set(partial_targets) if partial_targets is not None else None
    checker = _Checker(coerced, registry, env)
    outputs = [
        nid
        for nid, node in checker.nodes.items()
        if node.cls.OUTPUT_NODE and (targets is None or nid in targets)
    ]
    if not outputs:
        return _fail(coerced, error("prompt_no_outputs", "Prompt has no outputs"))
    checker.run(outputs)
    return checker.result(outputs)


def _fail(prompt: Any, err: dict[str, Any]) -> Validation:
    return Validation(ok=False, prompt=prompt if isinstance(prompt, dict) else {}, error=err)


def _check_classes(prompt: dict[Any, Any], registry: Registry) -> dict[str, Any] | None:
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        if not isinstance(node.get("inputs", {}), dict):
            return error(
                "invalid_prompt",
                "Cannot execute because a node's inputs are not an object.",
                f"Node ID '#{node_id}'",
            )
    missing: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        class_type = node["class_type"]
        if not isinstance(class_type, str) or class_type not in registry:
            missing.setdefault(str(node["class_type"]), []).append(f"#{node_id}")
    if not missing:
        return None
    # ComfyUI stops at the first; every missing type at once saves a round trip per node
    names = list(missing)
    subject = f"node {names[0]} does not" if len(names) == 1 else f"nodes {', '.join(names)} do not"
    at = ", ".join(f"{name} at Node ID '{' '.join(ids)}'" for name, ids in missing.items())
    return error(
        "invalid_prompt",
        f"Cannot execute because {subject} exist.",
        f"{at}. Missing: {describe_missing(names)}",
    )


class _Checker:
    """Validates every node that some output depends on, sources before consumers."""

    def __init__(self, prompt: dict[str, Any], registry: Registry, env: Environment) -> None:
        self.prompt = prompt
        self.registry = registry
        self.env = env
        self.errors: dict[str, list[dict[str, Any]]] = {}
        self.valid: dict[str, bool] = {}
        # parsed once: links and classes; the constants are replaced by coerced values as nodes pass
        self.nodes = {nid: parse_node(nid, node, registry) for nid, node in prompt.items()}
        self.constants = {nid: dict(node.constants) for nid, node in self.nodes.items()}
        self.graph: nx.DiGraph = nx.DiGraph()

    def run(self, outputs: list[str]) -> None:
        self.graph = dependency_graph(self.nodes, outputs)
        for cycle_nodes in _cycles(self.graph):
            members = sorted(cycle_nodes)
            for node_id in members:
                self.errors[node_id] = [
                    error(
                        "dependency_cycle",
                        "Dependency cycle detected",
                        f"node {node_id} is in a cycle through nodes {', '.join(members)}; remove a link",
                        nodes=members,
                    )
                ]
                self.valid[node_id] = False
        acyclic = [n for n in self.graph if n not in self.valid]
        for node_id in ordered(self.graph, outputs, self.nodes, acyclic):
            own = self._guarded_check(node_id)
            if own:
                self.errors[node_id] = own
            upstream_ok = all(self.valid.get(src, True) for src in self.graph.predecessors(node_id))
            self.valid[node_id] = not own and upstream_ok

    def result(self, outputs: list[str]) -> Validation:
        good = [o for o in outputs if self.valid.get(o, False)]
        node_errors: dict[str, Any] = {}
        lines: list[str] = []
        for out in outputs:
            if out in good:
                continue
            for node_id in nx.ancestors(self.graph, out) | {out}:
                if node_id not in self.errors:
                    continue
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": self.errors[node_id],
                        "dependent_outputs": [],
                        "class_type": self.prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(out)
        for entry in node_errors.values():
            lines.extend(f"{e['message']}: {e['details']}" for e in entry["errors"])
        if good:
            graph = self._prompt_graph(good)
            return Validation(ok=True, prompt=self.prompt, outputs=good, node_errors=node_errors, graph=graph)
        details = "\n".join(lines)
        err = error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return Validation(ok=False, prompt=self.prompt, error=err, node_errors=node_errors)

    def _prompt_graph(self, good: list[str]) -> PromptGraph:
        """The runnable part: the valid outputs and their ancestors, on the graph built for the checks."""
        nodes = {
            nid: PromptNode(nid, node.cls, self.constants[nid], node.links)
            for nid, node in self.nodes.items()
        }
        keep = set(good).union(*(nx.ancestors(self.graph, o) for o in good))
        graph = self.graph if len(keep) == len(self.graph) else self.graph.subgraph(keep).copy()
        return PromptGraph.build(nodes, good, self.prompt, graph)

    def _guarded_check(self, node_id: str) -> list[dict[str, Any]]:
        try:
            return self._check_node(node_id)
        except Exception as exc:  # e.g. a choice list that cannot be read: the node fails, not validation
            return [exception_error(exc)]

    def _check_node(self, node_id: str) -> list[dict[str, Any]]:
        inputs: dict[str, Any] = self.prompt[node_id]["inputs"]
        cls = self.nodes[node_id].cls
        custom = custom_checked_inputs(cls)
        errors: list[dict[str, Any]] = []
        for inp in cls.INPUTS:
            if isinstance(inp, Hidden):
                continue
            if inp.name not in inputs:
                if not inp.optional:
                    errors.append(
                        error(
                            "required_input_missing",
                            "Required input is missing",
                            inp.name,
                            input_name=inp.name,
                        )
                    )
                continue
            value = inputs[inp.name]
            if is_link(value):
                errors.extend(self._check_link(node_id, inp, value))
                continue
            problem = self._coerce(node_id, inp, unwrap(value), inp.name in custom)
            if problem is not None:
                errors.append(problem)
        if not errors:
            errors.extend(self._custom(node_id, cls))
        return errors

    def _check_link(self, node_id: str, inp: Input, value: list[Any]) -> list[dict[str, Any]]:
        config = inp.spec(self.env)
        extra = {"input_name": inp.name, "input_config": config, "received_value": value}
        if len(value) != 2:
            return [error("bad_linked_input", BAD_LINK_MESSAGE, inp.name, **extra)]
        source, slot = value
        if not isinstance(source, str):
            hint = f'; write the id as the string "{source}"' if str(source) in self.prompt else ""
            return [
                error(
                    "bad_linked_input",
                    BAD_LINK_MESSAGE,
                    f"{inp.name}: node id {source!r} is not a string{hint}",
                    **extra,
                )
            ]
        if source not in self.prompt:
            return [_missing_source(inp, config, value)]
        source_cls = self.nodes[source].cls
        if isinstance(slot, bool) or not isinstance(slot, (int, float)) or int(slot) != slot:
            return [
                error(
                    "bad_linked_input",
                    BAD_LINK_MESSAGE,
                    f"{inp.name}: output index {slot!r} is not an integer",
                    **extra,
                )
            ]
        if not 0 <= int(slot) < len(source_cls.OUTPUTS):
            count, kind = len(source_cls.OUTPUTS), source_cls.NODE_ID
            details = f"{inp.name}: node '{source}' ({kind}) has no output {int(slot)} (it has {count})"
            return [error("bad_linked_input", BAD_LINK_MESSAGE, details, **extra)]
        received = source_cls.OUTPUTS[int(slot)].type.name
        if received != inp.type.name:
            return [
                error(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    f"{inp.name}, received_type({received}) mismatch input_type({inp.type.name})",
                    input_name=inp.name,
                    input_config=config,
                    received_type=received,
                    linked_node=value,
                )
            ]
        return []

    def _coerce(self, node_id: str, inp: Input, value: Any, custom: bool) -> dict[str, Any] | None:
        if isinstance(inp, Socket):
            return error(
                "invalid_input_type",
                f"Failed to convert an input value to a {inp.type.name} value",
                f"{inp.name}, {value!r}, a {inp.type.name} input takes a link [node_id, index], not a value",
                input_name=inp.name,
                input_config=inp.spec(self.env),
                received_value=value,
            )
        checked = _without_bounds(inp) if custom else inp
        try:
            coerced = checked.coerce(value, self.env)
        except InputValueError as exc:
            config = inp.spec(self.env)
            if (
                exc.problem.type == "value_not_in_list"
                and isinstance(config[0], list)
                and len(config[0]) > 20
            ):
                config = None
            p = exc.problem
            return error(
                p.type, p.message, p.details, input_name=inp.name, input_config=config, received_value=value
            )
        self.constants[node_id][inp.name] = coerced
        # the wire copy keeps a list value wrapped, so nothing downstream reads it as a link
        self.prompt[node_id]["inputs"][inp.name] = {WRAPPED: coerced} if is_link(coerced) else coerced
        return None

    def _custom(self, node_id: str, cls: type[Node]) -> list[dict[str, Any]]:
        constants = self.constants[node_id]
        for inp in cls.INPUTS:
            if isinstance(inp, (FileChoice, ImageUpload)) and inp.name in constants:
                problem = inp.check(self.env, constants[inp.name])
                if problem is not None:  # reported as ComfyUI reports its nodes' VALIDATE_INPUTS
                    details = f"{inp.name} - {problem}"
                    return [error("custom_validation_failed", "Custom validation failed for node", details)]
        if "check_inputs" not in _overridden(cls):
            return []
        try:
            message = call_with_constants(cls.check_inputs, self.env, self.constants[node_id])
        except Exception as exc:  # a node's own check must not take validation down
            return [exception_error(exc)]
        if message is None or message is True:
            return []
        names = ", ".join(sorted(custom_checked_inputs(cls))) or cls.NODE_ID
        return [
            error("custom_validation_failed", "Custom validation failed for node", f"{names} - {message}")
        ]


def _missing_source(inp: Input, config: Any, link: list[Any]) -> dict[str, Any]:
    """A link to a node id the prompt does not have (ComfyUI fails on the KeyError; this names it)."""
    return error(
        "exception_during_inner_validation",
        "Exception when validating inner node",
        f"{inp.name}: linked node '{link[0]}' does not exist in the prompt",
        input_name=inp.name,
        input_config=config,
        exception_message=f"node '{link[0]}' not found",
        exception_type="KeyError",
        traceback=[],
        linked_node=link,
    )


def _cycles(graph: nx.DiGraph) -> list[set[str]]:
    return [
        set(c)
        for c in nx.strongly_connected_components(graph)
        if len(c) > 1 or graph.has_edge(*(list(c) * 2))
    ]


def _without_bounds(inp: Input) -> Input:
    """The input with range and membership checks off: the node's own check_inputs decides those."""
    if isinstance(inp, (Int, Float)):
        return dataclasses.replace(inp, min=None, max=None)
    if isinstance(inp, Combo):
        return dataclasses.replace(inp, check_membership=False)
    return inp


def _overridden(cls: type[Node]) -> set[str]:
    return {
        name
        for name in ("fingerprint", "check_inputs")
        if getattr(cls, name).__func__ is not getattr(Node, name).__func__
    }


@cache
def _named_params(func: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    """The input names a classmethod's function takes after (cls, env), and whether it takes **kwargs."""
    params = list(inspect.signature(func).parameters.values())[2:]
    names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def custom_checked_inputs(cls: type[Node]) -> set[str]:
    """Inputs the node's own check_inputs names: ComfyUI skips range and list checks for those."""
    if "check_inputs" not in _overridden(cls):
        return set()
    names, _ = _named_params(cls.check_inputs.__func__)  # type: ignore[attr-defined]
    return set(names)


def call_with_constants(method: Callable[..., Any], env: Environment, constants: Mapping[str, Any]) -> Any:
    """Call `fingerprint` or `check_inputs` with the constant inputs; a linked input it names gets None."""
    names, takes_kwargs = _named_params(method.__func__)  # type: ignore[attr-defined]
    kwargs = {n: constants.get(n) for n in names}
    if takes_kwargs:
        kwargs.update(constants)
    return method(env, **kwargs)


def qualified_name(kind: type) -> str:
    """An exception's class name as ComfyUI reports it: builtins bare, others with their module."""
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
