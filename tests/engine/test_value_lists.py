"""List outputs and INPUT_IS_LIST (ComfyUI's OUTPUT_IS_LIST / INPUT_IS_LIST): a node reading a list
runs once per item, shorter lists repeat their last item, a list-taking node runs once on everything,
and output nodes show what every call showed. Stub nodes, no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_stubs import NUMBER, Add, Scale, Show, Source, environment

from nodegraph.executor import Executor
from nodegraph.node import Int, Node, Output, RunContext, Socket
from nodegraph.registry import Registry
from nodegraph.validate import validate_prompt
from nodegraph.value_lists import ValueList


class Count(Node):
    """Emit 1..n as a list."""

    INPUTS = (Int("n", 3, min=0, max=10),)
    OUTPUTS = (Output(NUMBER, is_list=True),)
    CALLS: list[int] = []

    def run(self, ctx: RunContext, n: int) -> tuple[list[int]]:
        Count.CALLS.append(n)
        return (list(range(1, n + 1)),)


class Total(Node):
    """Sum every number that reaches it (one call for the whole list)."""

    INPUT_IS_LIST = True
    INPUTS = (Socket("x", socket_type=NUMBER), Int("times", 1, min=1, max=10))
    OUTPUTS = (Output(NUMBER),)
    SEEN: list[tuple[list[Any], list[int]]] = []

    def run(self, ctx: RunContext, x: list[int], times: list[int]) -> tuple[int]:
        Total.SEEN.append((x, times))
        return (sum(x) * times[0],)


class Pairs(Node):
    """Split each number into a list of two (a list output of a node run per item)."""

    INPUTS = (Socket("x", socket_type=NUMBER),)
    OUTPUTS = (Output(NUMBER, is_list=True), Output(NUMBER))

    def run(self, ctx: RunContext, x: int) -> tuple[list[int], int]:
        return ([x, -x], x * 10)


@pytest.fixture
def executor(tmp_path: Path) -> Executor:
    Count.CALLS.clear()
    Total.SEEN.clear()
    Show.SEEN.clear()
    return Executor(Registry([Source, Add, Scale, Show, Count, Total, Pairs]), environment(tmp_path))


def run(executor: Executor, prompt: dict[str, Any]) -> Any:
    checked = validate_prompt(prompt, executor.registry, executor.env)
    assert checked.ok, checked.node_errors
    return executor.execute(checked.graph or checked.prompt, "p", lambda event: None)


def test_a_node_reading_a_list_runs_per_item_and_shows_every_result(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "Count", "inputs": {"n": 3}},
        "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
    }
    outcome = run(executor, prompt)
    assert outcome.status == "success"
    assert outcome.outputs == {"3": {"values": [2.0, 4.0, 6.0]}}
    assert [seen["x"] for seen in Show.SEEN] == [2.0, 4.0, 6.0]
    again = run(executor, prompt)  # list outputs are cached like any other
    assert again.executed == [] and again.outputs == outcome.outputs and Count.CALLS == [3]


def test_a_shorter_list_repeats_its_last_item(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "Count", "inputs": {"n": 3}},
        "2": {"class_type": "Count", "inputs": {"n": 1}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"x": ["3", 0]}},
    }
    assert run(executor, prompt).outputs == {"4": {"values": [2, 3, 4]}}


def test_input_is_list_takes_everything_in_one_call(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "Count", "inputs": {"n": 4}},
        "2": {"class_type": "Total", "inputs": {"x": ["1", 0], "times": 2}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
        "4": {"class_type": "Source", "inputs": {"value": 5, "mode": "a"}},
        "5": {"class_type": "Total", "inputs": {"x": ["4", 0], "times": 1}},
        "6": {"class_type": "Show", "inputs": {"x": ["5", 0]}},
    }
    outcome = run(executor, prompt)
    assert outcome.outputs == {"3": {"values": [20]}, "6": {"values": [5]}}
    assert sorted(Total.SEEN) == [([1, 2, 3, 4], [2]), ([5], [1])]  # a plain value is a one-item list


def test_list_outputs_of_a_mapped_node_are_joined(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "Count", "inputs": {"n": 2}},
        "2": {"class_type": "Pairs", "inputs": {"x": ["1", 0]}},
        "3": {"class_type": "Total", "inputs": {"x": ["2", 0], "times": 1}},
        "4": {"class_type": "Show", "inputs": {"x": ["2", 1]}},
        "5": {"class_type": "Show", "inputs": {"x": ["3", 0]}},
    }
    outcome = run(executor, prompt)
    assert Total.SEEN == [([1, -1, 2, -2], [1])]
    assert outcome.outputs == {"4": {"values": [10, 20]}, "5": {"values": [0]}}


def test_an_empty_list_is_refused_naming_the_input(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "Count", "inputs": {"n": 0}},
        "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
    }
    outcome = run(executor, prompt)
    assert outcome.status == "error" and outcome.error.node_id == "2"
    assert "Scale: input x is an empty list" in outcome.error.message


def test_value_list_is_what_a_list_output_carries() -> None:
    assert ValueList((1, 2)).items == (1, 2)
