"""The registry: every node class by its id. Filled explicitly by `main`, never at import."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from nodegraph.env import Environment
from nodegraph.node import Node

log = logging.getLogger(__name__)


class Registry:
    """Node classes by node id (ComfyUI's `class_type`)."""

    def __init__(self, nodes: Iterable[type[Node]] = ()) -> None:
        self._nodes: dict[str, type[Node]] = {}
        for cls in nodes:
            self.add(cls)

    def add(self, cls: type[Node]) -> None:
        """Register one node class; a second class with the same id is an error.

        Args:
            cls: a `Node` subclass.
        """
        if not (isinstance(cls, type) and issubclass(cls, Node)):
            raise TypeError(f"{cls!r} is not a Node subclass")
        if cls.NODE_ID in self._nodes and self._nodes[cls.NODE_ID] is not cls:
            raise ValueError(f"two nodes are registered as {cls.NODE_ID!r}")
        self._nodes[cls.NODE_ID] = cls

    def get(self, node_id: str) -> type[Node] | None:
        return self._nodes.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __iter__(self) -> Iterator[type[Node]]:
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def object_info(self, env: Environment | None) -> dict[str, Any]:
        """`GET /object_info`: every node's schema; a node whose schema fails is logged and skipped."""
        info: dict[str, Any] = {}
        for node_id, cls in self._nodes.items():
            try:
                info[node_id] = cls.info(env)
            except Exception:  # a broken choice provider must not take the whole listing down
                log.exception("object_info failed for %s", node_id)
        return info
