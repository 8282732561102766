"""The SQLite queue and history on their own: order, trimming, recovery after a dead process."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from nodegraph.server.queue import PromptStore


def entry(n: int) -> dict[str, object]:
    return {
        "prompt": [n],
        "outputs": {},
        "status": {"status_str": "success", "completed": True, "messages": []},
    }


def test_order_is_number_then_arrival(tmp_path: Path) -> None:
    store = PromptStore(tmp_path / "q.sqlite3")
    store.put("a", {}, {}, [])
    store.put("b", {}, {}, [])
    store.put("front", {}, {}, [], front=True)
    store.put("explicit", {}, {}, [], number=-1000)
    assert [i.prompt_id for i in store.pending()] == ["explicit", "front", "a", "b"]
    assert [store.take(0).prompt_id for _ in range(4)] == ["explicit", "front", "a", "b"]  # type: ignore[union-attr]
    assert store.take(0.01) is None
    store.close()


def test_history_is_trimmed_to_its_maximum(tmp_path: Path) -> None:
    store = PromptStore(tmp_path / "q.sqlite3", max_history=3)
    for n in range(5):
        store.put(f"p{n}", {}, {}, [])
        store.take(0)
        store.finish(f"p{n}", entry(n))
    assert list(store.history()) == ["p2", "p3", "p4"]
    assert store.state_of("p0") is None and store.state_of("p4") == "done"
    store.close()


def test_a_prompt_left_running_is_retried_once_then_failed(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = PromptStore(path)
    store.put("p", {"1": {}}, {"client_id": "c"}, ["1"])
    assert store.take(0) is not None
    store.close()  # the process "dies" while p runs
    again = PromptStore(path)
    assert again.recovered == ["p"] and again.state_of("p") == "pending"
    assert again.take(0) is not None
    again.close()  # and dies again on the same prompt
    third = PromptStore(path)
    assert third.recovered == [] and third.state_of("p") == "done"
    failed = third.history_entry("p")
    assert failed is not None and failed["status"]["status_str"] == "error"
    assert "stopped twice" in failed["status"]["messages"][0][1]["exception_message"]
    third.close()


def test_take_wakes_when_a_prompt_arrives(tmp_path: Path) -> None:
    store = PromptStore(tmp_path / "q.sqlite3")
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.take(5)))
    waiter.start()
    store.put("late", {}, {}, [])
    waiter.join(5)
    assert got and got[0] is not None and got[0].prompt_id == "late"
    store.close()


def test_counter_continues_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = PromptStore(path)
    first = store.put("a", {}, {}, [])
    store.close()
    again = PromptStore(path)
    second = again.put("b", {}, {}, [])
    assert second.number > first.number
    assert [i.prompt_id for i in again.pending()] == ["a", "b"]
    again.close()


def test_remaining_follows_every_change_of_the_queue(tmp_path: Path) -> None:
    """The queue size is kept beside the table (it is asked for on every change): it must equal
    the table's row count after each kind of change, a restart and a history write that fails."""
    path = tmp_path / "q.sqlite3"
    store = PromptStore(path)

    def rows(s: PromptStore) -> int:
        return int(s._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0])

    for n in range(6):
        store.put(f"p{n}", {}, {}, [])
    assert store.remaining() == rows(store) == 6
    store.take(0)
    store.finish("p0", entry(0))
    assert store.remaining() == rows(store) == 5
    assert store.delete_pending(["p1", "p1", "nope", "p0"]) == ["p1"]
    assert store.remaining() == rows(store) == 4
    store.take(0)  # p2 runs
    assert store.clear_pending() == ["p3", "p4", "p5"]
    assert store.remaining() == rows(store) == 1
    store.finish("p9", entry(9))  # a prompt not in the queue: nothing leaves it
    store.put("p6", {}, {}, [])
    store.close()  # p2 was running: requeued at the next start
    again = PromptStore(path)
    assert again.remaining() == rows(again) == 2

    def full(*_: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    again.take(0)
    write, again._write_history = again._write_history, full  # type: ignore[method-assign]
    try:
        again.finish("p2", entry(2))
    except sqlite3.OperationalError:
        pass
    assert again.remaining() == rows(again) == 1  # p2 left the queue; its entry waits in memory
    again._write_history = write  # type: ignore[method-assign]
    again.take(0)
    again.finish("p6", entry(6))  # writes the kept entry too
    assert again.remaining() == rows(again) == 0 and "p2" in again.history()
    again.close()
