"""Executor: order, caching by signature, interrupts, errors, events."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from engine_stubs import Random, Show, Slow, Stamp, chain_prompt, environment, registry

from nodegraph import events as ev
from nodegraph.executor import Executor, Outcome
from nodegraph.validate import validate_prompt


class Recorder:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def __call__(self, event: ev.Event) -> None:
        self.events.append(event)

    def of(self, kind: type[ev.Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def executor(tmp_path: Path) -> Executor:
    return Executor(registry(), environment(tmp_path))


def run(executor: Executor, prompt: dict[str, Any], rec: Recorder | None = None, **kw: Any) -> Outcome:
    checked = validate_prompt(prompt, executor.registry, executor.env)
    assert checked.ok, checked.node_errors
    return executor.execute(checked.graph or checked.prompt, "p1", rec or Recorder(), **kw)


def test_runs_outputs_and_ancestors_with_results(executor: Executor) -> None:
    outcome = run(executor, chain_prompt())
    assert outcome.status == "success"
    assert sorted(outcome.executed) == ["1", "2", "3", "4", "5"]
    assert outcome.outputs == {"3": {"values": [6.0]}, "5": {"values": [9.0]}}


def test_order_is_topological_and_output_first(executor: Executor) -> None:
    outcome = run(executor, chain_prompt())
    order = outcome.executed
    assert order.index("1") < order.index("2") < order.index("3")
    assert order.index("3") < order.index("4")  # Show 3 is ready once 2 ran: output nodes go first


def test_unreferenced_nodes_do_not_run(executor: Executor) -> None:
    prompt = chain_prompt()
    prompt["9"] = {"class_type": "Source", "inputs": {"value": 4, "mode": "a"}}
    assert "9" not in run(executor, prompt).executed


def test_unchanged_graph_is_fully_cached(executor: Executor) -> None:
    run(executor, chain_prompt())
    rec = Recorder()
    outcome = run(executor, chain_prompt(), rec)
    assert outcome.executed == [] and sorted(outcome.cached) == ["1", "2", "3", "4", "5"]
    assert rec.of(ev.ExecutionCached)[0].nodes == ("1", "2", "3", "4", "5")
    shown = {e.node: dict(e.output) for e in rec.of(ev.Executed)}
    assert shown == {"3": {"values": [6.0]}, "5": {"values": [9.0]}}  # cached outputs are re-sent
    assert outcome.outputs == shown


def test_changed_widget_reruns_that_node_and_descendants_only(executor: Executor) -> None:
    run(executor, chain_prompt())
    prompt = chain_prompt()
    prompt["2"]["inputs"]["factor"] = 3.0
    outcome = run(executor, prompt)
    assert sorted(outcome.executed) == ["2", "3", "4", "5"]
    assert outcome.cached == ["1"]
    assert outcome.outputs["5"] == {"values": [12.0]}


def test_same_subgraph_under_other_ids_is_cached(executor: Executor) -> None:
    run(executor, chain_prompt())
    renamed = {
        "a": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
        "b": {"class_type": "Scale", "inputs": {"x": ["a", 0], "factor": 2.0}},
        "c": {"class_type": "Show", "inputs": {"x": ["b", 0]}},
    }
    outcome = run(executor, renamed)
    assert outcome.executed == [] and sorted(outcome.cached) == ["a", "b", "c"]


def test_file_fingerprint_change_reruns(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "Stamp", "inputs": {"path": "f"}},
        "2": {"class_type": "Show", "inputs": {"x": ["1", 0]}},
    }
    Stamp.CONTENTS["f"] = 1
    run(executor, prompt)
    assert run(executor, prompt).executed == []
    Stamp.CONTENTS["f"] = 2
    outcome = run(executor, prompt)
    assert outcome.executed == ["1", "2"] and outcome.outputs["2"] == {"values": [2]}


def test_non_idempotent_nodes_are_not_shared(executor: Executor) -> None:
    prompt = {
        "1": {"class_type": "Random", "inputs": {"seed": 0}},
        "2": {"class_type": "Random", "inputs": {"seed": 0}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"x": ["3", 0]}},
    }
    Random.COUNTER[0] = 0
    outcome = run(executor, prompt)
    assert "1" in outcome.executed and "2" in outcome.executed
    assert outcome.outputs["4"] == {"values": [3]}


def test_hidden_inputs(executor: Executor) -> None:
    prompt = chain_prompt()
    run(executor, prompt, extra_data={"extra_pnginfo": {"workflow": {"w": 1}}})
    seen = Show.SEEN[0]
    assert seen["extra"] == {"workflow": {"w": 1}}
    assert seen["prompt"]["1"]["class_type"] == "Source"


def test_events_in_order(executor: Executor) -> None:
    rec = Recorder()
    run(executor, {"1": chain_prompt()["1"], "3": {"class_type": "Show", "inputs": {"x": ["1", 0]}}}, rec)
    kinds = [type(e).__name__ for e in rec.events]
    assert kinds == [
        "ExecutionStart",
        "ExecutionCached",
        "Executing",
        "Executing",
        "Executed",
        "ExecutionSuccess",
    ]
    assert all(e.prompt_id == "p1" for e in rec.events)


def test_exception_is_reported_and_does_not_poison_the_cache(executor: Executor) -> None:
    prompt = chain_prompt()
    prompt["6"] = {"class_type": "Fail", "inputs": {"x": ["2", 0], "fail": True}}
    prompt["3"]["inputs"]["x"] = ["6", 0]
    rec = Recorder()
    outcome = run(executor, prompt, rec)
    assert outcome.status == "error"
    err = rec.of(ev.ExecutionError)[0]
    assert (err.node_id, err.node_type, err.exception_type) == ("6", "Fail", "ValueError")
    assert err.message == "asked to fail" and err.current_inputs == {"x": [6.0], "fail": [True]}
    assert "1" in err.executed and any("asked to fail" in line for line in err.traceback)
    assert set(err.current_outputs) == set(err.executed) and "6" not in err.current_outputs
    assert not rec.of(ev.ExecutionSuccess)
    prompt["6"]["inputs"]["fail"] = False
    outcome = run(executor, prompt)
    assert outcome.status == "success"
    assert "1" not in outcome.executed and "6" in outcome.executed  # what ran before the failure is kept
    assert outcome.outputs["3"] == {"values": [6.0]}


def test_wrong_number_of_outputs_is_an_error(executor: Executor) -> None:
    from engine_stubs import Add

    original = Add.run
    try:
        Add.run = lambda self, ctx, a, b=0: (a, b)  # type: ignore[method-assign,assignment]
        outcome = run(executor, chain_prompt())
    finally:
        Add.run = original  # type: ignore[method-assign]
    assert outcome.status == "error" and outcome.error is not None
    assert "returned 2 values for 1 declared outputs" in outcome.error.message  # type: ignore[union-attr]


def slow_prompt(steps: int = 1000) -> dict[str, Any]:
    return {
        "1": {"class_type": "Source", "inputs": {"value": 1, "mode": "a"}},
        "2": {"class_type": "Slow", "inputs": {"x": ["1", 0], "steps": steps}},
        "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
    }


def test_interrupt_from_another_thread_stops_within_a_step(executor: Executor) -> None:
    Slow.STARTED.clear()
    Slow.GATE.clear()
    rec = Recorder()
    result: list[Outcome] = []
    worker = threading.Thread(target=lambda: result.append(run(executor, slow_prompt(), rec)))
    worker.start()
    assert Slow.STARTED.wait(5)
    executor.interrupt("another-prompt")  # not the running one: ignored
    executor.interrupt("p1")
    Slow.GATE.set()
    worker.join(5)
    outcome = result[0]
    assert outcome.status == "interrupted"
    assert Slow.STEPS_DONE == [1]  # the next progress call raised
    event = rec.of(ev.ExecutionInterrupted)[0]
    assert (event.node_id, event.node_type, event.executed) == ("2", "Slow", ("1",))
    Slow.GATE.set()
    assert run(executor, slow_prompt(3)).status == "success"  # the flag was reset


def test_interrupt_while_idle_is_discarded(executor: Executor) -> None:
    executor.interrupt()
    assert run(executor, chain_prompt()).status == "success"


def test_progress_and_warnings_are_events(executor: Executor) -> None:
    Slow.GATE.set()
    prompt = slow_prompt(3)
    prompt["4"] = {"class_type": "Warn", "inputs": {"x": ["1", 0]}}
    prompt["5"] = {"class_type": "Show", "inputs": {"x": ["4", 0]}}
    rec = Recorder()
    run(executor, prompt, rec)
    assert [(p.node, p.value, p.max) for p in rec.of(ev.Progress)] == [("2", 1, 3), ("2", 2, 3), ("2", 3, 3)]
    warning = rec.of(ev.NodeWarning)[0]
    assert (warning.node, warning.message, dict(warning.details)) == ("4", "careful", {"why": "test"})


def test_cache_is_bounded_by_entries(tmp_path: Path) -> None:
    executor = Executor(registry(), environment(tmp_path), max_entries=3)
    run(executor, chain_prompt())  # 5 entries, all pinned while the prompt ran
    assert len(executor.cache) == 3


def test_cache_is_bounded_by_bytes(tmp_path: Path) -> None:
    from nodegraph.cache import CacheEntry, OutputCache

    cache = OutputCache(max_entries=100, max_bytes=250)
    for i in range(4):
        cache.put(f"s{i}", CacheEntry((), None, 100))
    assert len(cache) == 2 and "s0" not in cache and "s3" in cache and cache.nbytes == 200
    cache.pin(["s2"])
    cache.get("s3")
    cache.put("s4", CacheEntry((), None, 100))
    assert "s2" in cache and "s3" not in cache  # pinned survives; LRU order otherwise


def test_estimate_nbytes_finds_arrays() -> None:
    import numpy as np

    from nodegraph.cache import estimate_nbytes

    arr = np.zeros((10, 10), dtype=np.float32)
    assert estimate_nbytes(({"samples": arr, "other": [arr]}, "text")) == 400  # the same array counts once


def test_reset_clears_the_cache(executor: Executor) -> None:
    run(executor, chain_prompt())
    executor.reset()
    assert len(run(executor, chain_prompt()).executed) == 5


def test_node_instances_are_kept_per_id_and_class(executor: Executor) -> None:
    run(executor, chain_prompt())
    first = executor.instance("2", registry().get("Scale"))  # type: ignore[arg-type]
    prompt = chain_prompt()
    prompt["2"]["inputs"]["factor"] = 5.0
    run(executor, prompt)
    assert executor.instance("2", registry().get("Scale")) is first  # type: ignore[arg-type]


def test_identical_nodes_in_one_prompt_run_once(executor: Executor) -> None:
    from engine_stubs import Source

    prompt = chain_prompt()
    prompt["6"] = {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}}  # the same as node 1
    prompt["7"] = {"class_type": "Show", "inputs": {"x": ["6", 0]}}
    outcome = run(executor, prompt)
    assert Source.RUNS[0] == 1 and outcome.status == "success"
    ran = {"1", "6"} & set(outcome.executed)
    assert len(ran) == 1 and ({"1", "6"} - ran) <= set(outcome.cached)  # one ran, its twin reused it
    assert outcome.outputs["7"] == {"values": [3]} and outcome.outputs["5"] == {"values": [9.0]}
