"""Nodes: latent (being written)."""

from nodegraph.node import Node

NODES: tuple[type[Node], ...] = ()
