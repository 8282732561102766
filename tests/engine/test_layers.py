"""The layers, enforced: an import graph of `nodegraph/` and `nodes/` built with `ast`, checked for
forbidden arrows.

Every `import`, `from ... import` (relative ones resolved; function-level and `TYPE_CHECKING`
imports included and marked) and `importlib.import_module("literal")` is an edge. The rules:

* the engine, server and CLI (`nodegraph/`) never import torch, diffusers or transformers;
* `nodegraph/` never imports `nodes`, except that the CLI (the composition root) imports the
  `nodes` package itself (`nodes/__init__.py`, its entry API) and nothing below it;
* `nodes/sd/` (model code) never imports `nodegraph` (the engine or the server), except
  `nodegraph.primitives` (`LruCache`, `file_stamp`), a leaf that imports nothing of the project;
* `nodes/` never imports `nodegraph.server`.

`KNOWN` lists the violations still waiting for their fix; it may only shrink (an entry that no
longer occurs fails too, so the list is kept exact).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("nodegraph", "nodes")
MODEL_LIBRARIES = ("torch", "diffusers", "transformers")
CLI = ("nodegraph.cli", "nodegraph.cli_report", "nodegraph.cli_train", "nodegraph.__main__")
COMPOSITION_ROOT = "nodes"  # the one module of `nodes` the CLI may import
SHARED_LEAF = "nodegraph.primitives"  # the one module of `nodegraph` the model code may import

# (importer, imported) pairs still to fix, each with the issue that owns it (none today).
KNOWN: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    how: str  # "import", "function", "TYPE_CHECKING" or "importlib"

    def __str__(self) -> str:
        path = self.importer.replace(".", "/")
        return f"{path}.py:{self.line}: {self.importer} -> {self.imported} ({self.how})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """Collects the imports of one module with where they sit."""

    def __init__(self, name: str, is_package: bool, known: set[str]) -> None:
        self.name, self.is_package, self.known = name, is_package, known
        self.edges: list[Edge] = []
        self._context: list[str] = []

    def _add(self, target: str, line: int, how: str | None = None) -> None:
        kind = how or (self._context[-1] if self._context else "import")
        self.edges.append(Edge(self.name, self._deepest(target), line, kind))

    def _deepest(self, target: str) -> str:
        """The longest prefix of a dotted name that is a module of the project (or the name itself)."""
        parts = target.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.known:
                return ".".join(parts[:end])
        return target

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if guarded:
            self._context.append("TYPE_CHECKING")
            for child in node.body:
                self.visit(child)
            self._context.pop()
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._context.append("function")
        self.generic_visit(node)
        self._context.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            self._add(f"{base}.{alias.name}", node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            if isinstance(node.args[0].value, str):
                self._add(node.args[0].value, node.lineno, "importlib")
        self.generic_visit(node)


def import_graph() -> list[Edge]:
    found = modules()
    edges: list[Edge] = []
    for name, path in found.items():
        visitor = _Imports(name, path.name == "__init__.py", set(found))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        edges.extend(visitor.edges)
    return edges


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden(edge: Edge) -> str | None:
    """The rule an edge breaks, or None."""
    src, dst = edge.importer, edge.imported
    if _within(src, "nodegraph"):
        if any(_within(dst, lib) for lib in MODEL_LIBRARIES):
            return "nodegraph never imports the model libraries"
        if _within(dst, "nodes"):
            if src in CLI and dst == COMPOSITION_ROOT:
                return None
            return "nodegraph never imports nodes (only the CLI imports the `nodes` package's entry API)"
    if src == SHARED_LEAF and (_within(dst, "nodegraph") or _within(dst, "nodes")):
        return "nodegraph/primitives.py imports nothing of the project (model code imports it)"
    if _within(src, "nodes.sd") and _within(dst, "nodegraph") and dst != SHARED_LEAF:
        return "nodes/sd/ (model code) never imports nodegraph"
    if _within(src, "nodes") and _within(dst, "nodegraph.server"):
        return "nodes/ never imports the server"
    return None


def test_no_forbidden_arrows() -> None:
    broken = [f"{edge}: {rule}" for edge in import_graph() if (rule := forbidden(edge))]
    broken = [
        line for line in broken if not any(line.split(": ")[1].startswith(f"{a} -> {b} ") for a, b in KNOWN)
    ]
    assert not broken, "forbidden imports:\n" + "\n".join(broken)


def test_known_violations_still_exist() -> None:
    """Fixed ones must leave KNOWN, so the list shrinks to zero."""
    present = {(e.importer, e.imported) for e in import_graph() if forbidden(e)}
    assert KNOWN <= present, f"fixed, remove from KNOWN: {sorted(KNOWN - present)}"


def test_the_graph_sees_every_kind_of_import() -> None:
    """The scanner itself: importlib strings, function-level and TYPE_CHECKING imports are edges."""
    edges = {(e.importer, e.imported, e.how) for e in import_graph()}
    assert ("nodegraph.cli", "nodes", "importlib") in edges
    assert any(how == "TYPE_CHECKING" for _, _, how in edges)
    assert ("nodes", "nodes.sd.device", "function") in edges  # nodes/__init__.py's lazy entry API


def test_the_rules_catch_each_arrow() -> None:
    def edge(src: str, dst: str) -> Edge:
        return Edge(src, dst, 1, "import")

    assert forbidden(edge("nodegraph.cache", "torch"))
    assert forbidden(edge("nodegraph.engine", "nodes"))
    assert forbidden(edge("nodegraph.cli", "nodes.sd.device"))
    assert forbidden(edge("nodegraph.server.app", "nodes"))
    assert forbidden(edge("nodes.sd.lora.tags", "nodegraph.folders"))
    assert forbidden(edge("nodes.lora", "nodegraph.server.frontend"))
    assert forbidden(edge("nodegraph.cli", "nodes")) is None
    assert forbidden(edge("nodes.lora", "nodegraph.folders")) is None
    assert forbidden(edge("nodes.sd.checkpoint", "torch")) is None
    assert forbidden(edge("nodes.sd.model_store", "nodegraph.primitives")) is None
    assert forbidden(edge("nodegraph.primitives", "nodegraph.folders"))
