"""Bounded work (D2), storage faults (D9, D10), hostile names and numbers (D12-D14): 4xx, never 5xx."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from nodegraph.server import create_app
from nodegraph.server.queue import PromptStore
from nodegraph.server.replies import JSON_ON_LOOP
from tests.server.clients import wait_done
from tests.server.stubs import make_engine, txt2img

pytestmark = pytest.mark.asyncio


def self_nesting(width: int = 2) -> dict[str, Any]:
    """The review's 460-byte workflow: a subgraph that holds itself `width` times."""
    inner = [{"id": i + 1, "type": "S", "inputs": [], "outputs": []} for i in range(width)]
    return {
        "nodes": [{"id": 1, "type": "S", "inputs": [], "outputs": []}],
        "links": [],
        "definitions": {"subgraphs": [{"id": "S", "nodes": inner, "links": []}]},
    }


def wide_tree(fanout: int, depth: int) -> dict[str, Any]:
    """Subgraph Lk holds `fanout` instances of Lk+1: fanout**depth nodes, no recursion."""
    defs = []
    for level in range(depth):
        kind = "StubSeed" if level == depth - 1 else f"L{level + 1}"
        nodes = [{"id": i + 1, "type": kind, "inputs": [], "outputs": []} for i in range(fanout)]
        defs.append({"id": f"L{level}", "nodes": nodes, "links": []})
    top = [{"id": 1, "type": "L0", "inputs": [], "outputs": []}]
    return {"nodes": top, "links": [], "definitions": {"subgraphs": defs}}


async def test_workflow_bombs_are_refused_quickly_and_the_server_keeps_answering(
    aiohttp_client: Any, engine: Any
) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    start = time.monotonic()
    bombs = [client.post("/prompt", json={"prompt": self_nesting()}) for _ in range(8)]
    bombs += [client.post("/prompt", json={"prompt": wide_tree(10, 6)}) for _ in range(2)]
    queue = client.get("/queue")
    *answers, queued = await asyncio.gather(*bombs, queue)
    assert queued.status == 200
    for resp in answers:
        body = await resp.json()
        assert resp.status == 400, body
        message = body["error"]["message"]
        assert "contains itself" in message or "expands to more than" in message, message
    assert time.monotonic() - start < 20


async def test_large_json_bodies_are_checked_as_small_ones(aiohttp_client: Any, engine: Any) -> None:
    """Bodies over `JSON_ON_LOOP` are parsed on a thread: the same 400s and the same prompt."""
    client: TestClient = await aiohttp_client(create_app(engine))
    pad = "x" * (JSON_ON_LOOP + 1)
    for raw in ("[" * 100_000 + "]" * 100_000, '{"prompt": {}, "pad": "' + pad + '", "bad": "\\ud800"}'):
        resp = await client.post("/prompt", data=raw)
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_json"
    body = {"prompt": txt2img(), "extra_data": {"extra_pnginfo": {"pad": pad}}}
    resp = await client.post("/prompt?wait=1", json=body)
    assert resp.status == 200 and (await resp.json())["status"] == "success"


async def test_non_finite_number_and_absurd_queries_are_400s(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    for raw in (
        '{"prompt": %s, "number": 1e999}',
        '{"prompt": %s, "number": NaN}',
        '{"prompt": %s, "number": "x"}',
    ):
        resp = await client.post("/prompt", data=raw % '{"1": {"class_type": "StubSeed", "inputs": {}}}')
        body = await resp.json()
        assert resp.status == 400 and "node_errors" in body and "number" in body["error"]["message"]
    assert "Infinity" not in await (await client.get("/queue")).text()
    for query in (
        "max_items=99999999999999999999",
        "max_items=-1",
        "offset=1e20",
        "offset=99999999999999999999",
    ):
        assert (await client.get(f"/history?{query}")).status == 400, query


async def test_hostile_upload_names_and_targets_are_4xx(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    inputs = Path(engine.env.folders.input_dir)
    (inputs / "afile").write_bytes(b"x")
    (inputs / "adir.png").mkdir()

    async def upload(filename: str, subfolder: str = "", overwrite: str = "true") -> int:
        form = FormData()
        form.add_field("image", b"\x89PNG fake", filename=filename, content_type="image/png")
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", overwrite)
        resp = await client.post("/upload/image", data=form)
        assert resp.status < 500, (filename[:20], subfolder[:20], await resp.text())
        return resp.status

    assert await upload("n" * 300 + ".png") == 400
    assert await upload("ok.png", "s/" * 2000) == 400  # was RecursionError after ~1,000 folders
    assert not (inputs / "s").exists()
    assert await upload("ok.png", "x" * 300) == 400
    assert await upload("ok.png", "afile") == 409  # the subfolder is a file
    assert await upload("adir.png") == 409  # the target is a folder


async def test_full_disk_and_read_only_folders_are_clear_errors(
    aiohttp_client: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodegraph.server import routes_files

    app = create_app(engine)
    client: TestClient = await aiohttp_client(app)

    def refuse(*_: Any, **__: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(routes_files, "_store", refuse)
    form = FormData()
    form.add_field("image", b"x", filename="a.png")
    resp = await client.post("/upload/image", data=form)
    assert resp.status == 403 and (await resp.json())["error"]["type"] == "read_only"

    def full(*_: Any, **__: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    from nodegraph.server.state import STATE

    monkeypatch.setattr(app[STATE].store, "put", full)
    resp = await client.post("/prompt", json={"prompt": txt2img()})
    body = await resp.json()
    assert resp.status == 507 and "disk is full" in body["error"]["message"]
    assert "bug" not in body["error"]["details"]


async def test_a_failed_history_write_never_leaves_a_ghost(
    aiohttp_client: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodegraph.server.state import STATE

    app = create_app(engine)
    client: TestClient = await aiohttp_client(app)
    store = app[STATE].store
    real = store._write_history

    def full(*_: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_write_history", full)
    pid = (await (await client.post("/prompt", json={"prompt": txt2img()})).json())["prompt_id"]
    entry = await wait_done(client, pid)
    assert entry["status"]["status_str"] == "success"
    queue = await (await client.get("/queue")).json()
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert pid in await (await client.get("/history")).json()
    monkeypatch.setattr(store, "_write_history", real)  # space again: kept entries are written
    second = (await (await client.post("/prompt", json={"prompt": txt2img(seed=2)})).json())["prompt_id"]
    await wait_done(client, second)
    assert not store._unsaved and store.history_entry(pid) is not None


@pytest.mark.parametrize(
    "damage",
    [b"", b"garbage" * 600, b"SQLite format 3\x00" + b"\xff" * 4000, "folder"],
)
async def test_a_damaged_queue_database_is_moved_aside(tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "queue.sqlite3"
    if damage == "folder":
        path.mkdir()
    else:
        path.write_bytes(damage)
    store = PromptStore(path)
    try:
        store.put("p1", {"1": {}}, {}, ["1"])
        assert [i.prompt_id for i in store.pending()] == ["p1"]
        if damage:
            assert store.moved_aside is not None and store.moved_aside.exists()
            assert store.moved_aside.name.startswith("queue.sqlite3.corrupt-")
    finally:
        store.close()


async def test_move_onto_a_folder_is_refused(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    assert (await client.post("/userdata/a.json", data=b"{}")).status == 200
    (Path(engine.env.folders.user_dir) / "default" / "dir").mkdir()
    assert (await client.post("/userdata/a.json/move/dir")).status == 409
    assert (await client.post("/userdata/dir", data=b"x")).status == 409


async def test_queue_cap(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path, max_queue_size=2)))
    slow = txt2img(steps=1, delay=0.5)
    codes = [(await client.post("/prompt", json={"prompt": {**slow}})).status for _ in range(4)]
    assert codes[:2] == [200, 200] and 429 in codes[2:]
