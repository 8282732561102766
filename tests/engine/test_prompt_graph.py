"""`prompt_graph.ordered`: networkx's lexicographical order with ComfyUI's pick rule, on plain dicts."""

from __future__ import annotations

import random

import networkx as nx
import pytest

from nodegraph.prompt_graph import ordered


def reference(graph: nx.DiGraph, targets: set[str], nodes: list[str]) -> list[str]:
    """The order as networkx computes it with the same key (what `ordered` replaced)."""
    position = {nid: i for i, nid in enumerate(nodes)}

    def rank(node_id: str) -> tuple[int, int]:
        if node_id in targets:
            return (0, position[node_id])
        return (1 if any(s in targets for s in graph.successors(node_id)) else 2, position[node_id])

    return list(nx.lexicographical_topological_sort(graph, key=rank))


@pytest.mark.parametrize("seed", range(40))
def test_the_order_is_networkx_lexicographical_order_on_random_dags(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.randint(1, 60)
    nodes = [str(i) for i in rng.sample(range(1000), size)]  # prompt order is not id order
    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    for j, consumer in enumerate(nodes):
        for source in rng.sample(nodes[:j], min(j, rng.randint(0, 3))):
            graph.add_edge(source, consumer)
    targets = {n for n in nodes if graph.out_degree(n) == 0 and rng.random() < 0.7}
    shuffled = nodes[:]
    rng.shuffle(shuffled)
    assert ordered(graph, targets, shuffled) == reference(graph, targets, shuffled)
    subset = [n for n in nodes if rng.random() < 0.6]
    assert ordered(graph, targets, shuffled, subset) == reference(graph.subgraph(subset), targets, shuffled)


def test_a_cycle_is_refused() -> None:
    graph: nx.DiGraph = nx.DiGraph([("a", "b"), ("b", "c"), ("c", "b")])
    with pytest.raises(nx.NetworkXUnfeasible):
        ordered(graph, {"c"}, ["a", "b", "c"])
