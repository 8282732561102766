"""Per-output cache keys: a consumer's key is the output it reads, and one parse of a prompt.

Beside `test_executor.py`'s re-run tests: an output that declares `depends_on` keeps its key when
another input of its node changes, so its consumers stay cached while the node itself re-runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_stubs import NUMBER, Pair, chain_prompt, environment, pair_prompt, registry

from nodegraph import prompt_graph, validate
from nodegraph.executor import Executor, Outcome
from nodegraph.node import Float, Node, NodeDeclarationError, Output, RunContext, Socket
from nodegraph.prompt_graph import Link, PromptGraph
from nodegraph.validate import validate_prompt


@pytest.fixture
def executor(tmp_path: Path) -> Executor:
    return Executor(registry(), environment(tmp_path))


def run(executor: Executor, prompt: dict[str, Any]) -> Outcome:
    checked = validate_prompt(prompt, executor.registry, executor.env)
    assert checked.ok and checked.graph is not None, checked.node_errors
    return executor.execute(checked.graph, "p", lambda event: None)


def test_changing_one_widget_reruns_only_consumers_of_the_outputs_it_feeds(executor: Executor) -> None:
    run(executor, pair_prompt())
    prompt = pair_prompt()
    prompt["2"]["inputs"]["a"] = 4.0
    outcome = run(executor, prompt)
    assert sorted(outcome.executed) == ["2", "3", "4"]  # the pair re-runs; `right`'s consumers do not
    assert outcome.outputs["4"] == {"values": [16.0]} and outcome.outputs["6"] == {"values": [9.0]}
    prompt["2"]["inputs"]["b"] = 5.0
    outcome = run(executor, prompt)
    assert sorted(outcome.executed) == ["2", "5", "6"]
    assert outcome.outputs["6"] == {"values": [15.0]}


def test_a_cached_consumer_does_not_make_its_producer_run(executor: Executor) -> None:
    run(executor, pair_prompt())
    prompt = pair_prompt()
    prompt["2"]["inputs"]["a"] = 4.0
    del prompt["4"], prompt["3"]  # only `right` is wanted, and its key did not change
    outcome = run(executor, prompt)
    assert outcome.executed == [] and sorted(outcome.cached) == ["1", "5", "6"]  # 2 is not needed


def test_a_derived_dependency_counts_only_its_part_of_the_value(executor: Executor) -> None:
    run(executor, pair_prompt())
    prompt = pair_prompt()
    prompt["2"]["inputs"]["note"] = "left other"  # the first word, which `left` reads, is unchanged
    assert run(executor, prompt).executed == []  # no consumer needs the pair to run again
    prompt["2"]["inputs"]["note"] = "longer other"
    outcome = run(executor, prompt)
    assert sorted(outcome.executed) == ["2", "3", "4"] and outcome.outputs["4"] == {"values": [12.0]}


def test_an_upstream_change_reaches_every_output(executor: Executor) -> None:
    run(executor, pair_prompt())
    prompt = pair_prompt()
    prompt["1"]["inputs"]["value"] = 4
    assert sorted(run(executor, prompt).executed) == ["1", "2", "3", "4", "5", "6"]


def test_without_declarations_every_output_follows_every_input(executor: Executor) -> None:
    run(executor, pair_prompt("PlainPair"))
    prompt = pair_prompt("PlainPair")
    prompt["2"]["inputs"]["a"] = 4.0
    assert sorted(run(executor, prompt).executed) == ["2", "3", "4", "5", "6"]  # ComfyUI's behaviour


def test_outputs_of_one_node_have_distinct_keys(executor: Executor) -> None:
    prompt = pair_prompt()
    prompt["2"]["inputs"]["a"] = prompt["2"]["inputs"]["b"] = 1.0
    prompt["2"]["inputs"]["note"] = ""  # left = x * 1 + 0 = right: equal values, still two keys
    outcome = run(executor, prompt)
    assert sorted(outcome.executed) == ["1", "2", "3", "4", "5", "6"] and Pair.RUNS[0] == 1


def test_depends_on_must_name_declared_inputs() -> None:
    with pytest.raises(NodeDeclarationError, match="depends on 'strength'"):

        class Bad(Node):
            """Declares a dependency on an input it does not have."""

            INPUTS = (Socket("x", socket_type=NUMBER), Float("a", 1.0))
            OUTPUTS = (Output(NUMBER, depends_on=("x", "strength")),)

            def run(self, ctx: RunContext, x: float, a: float) -> tuple[float]:
                return (x,)


def test_validation_returns_the_parsed_prompt(tmp_path: Path) -> None:
    checked = validate_prompt(chain_prompt(), registry(), environment(tmp_path))
    graph = checked.graph
    assert graph is not None and graph.targets == ("3", "5")
    scale = graph.nodes["2"]
    assert scale.cls.NODE_ID == "Scale" and scale.links == {"x": Link("1", 0)}
    assert scale.constants == {"factor": 2.0}
    assert set(graph.graph.edges) == {("1", "2"), ("2", "3"), ("1", "4"), ("2", "4"), ("4", "5")}
    assert graph.order.index("1") < graph.order.index("2") < graph.order.index("3")


def test_a_prompt_is_parsed_and_its_dependency_graph_built_once(
    executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[int] = []
    original = prompt_graph.dependency_graph

    def counting(*args: Any) -> Any:
        builds.append(1)
        return original(*args)

    monkeypatch.setattr(prompt_graph, "dependency_graph", counting)
    monkeypatch.setattr(validate, "dependency_graph", counting)
    outcome = run(executor, chain_prompt())
    assert outcome.status == "success" and len(builds) == 1


def test_a_prompt_from_the_queue_runs_as_its_dict(executor: Executor) -> None:
    checked = validate_prompt(pair_prompt(), executor.registry, executor.env)
    outcome = executor.execute(checked.prompt, "p", lambda event: None, outputs=checked.outputs)
    assert outcome.status == "success" and outcome.outputs["6"] == {"values": [9.0]}
    again = run(executor, pair_prompt())  # the same keys whichever way the prompt came in
    assert again.executed == []


def test_a_list_valued_widget_stays_a_constant(tmp_path: Path) -> None:
    prompt = chain_prompt()
    prompt["2"]["inputs"]["factor"] = {"__value__": 2}
    checked = validate_prompt(prompt, registry(), environment(tmp_path))
    assert checked.graph is not None and checked.graph.nodes["2"].constants["factor"] == 2.0
    wire = {"1": {"class_type": "Word", "inputs": {"text": {"__value__": ["1", 0]}}}}
    parsed = PromptGraph.parse(wire, registry(), ["1"])
    assert parsed.nodes["1"].constants == {"text": ["1", 0]} and parsed.nodes["1"].links == {}
