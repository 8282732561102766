"""ComfyUI's jobs API over the SQLite queue (filters, sort, pages, detail, cancel); canvas start-up routes."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from nodegraph.server.queue import PromptStore
from tests.server.clients import client_for, wait_done, wait_running
from tests.server.stubs import txt2img


def failing() -> dict[str, Any]:
    return {"1": {"class_type": "StubFail", "inputs": {"message": "boom"}}}


async def _queue(client: Any, prompt: dict[str, Any], **body: Any) -> str:
    reply = await client.post("/prompt", json={"prompt": prompt, **body})
    assert reply.status == 200, await reply.text()
    return str((await reply.json())["prompt_id"])


@pytest.mark.asyncio
async def test_jobs_list_filters_sorts_pages_and_details(aiohttp_client: Any, engine: Any) -> None:
    client = await client_for(aiohttp_client, engine)
    workflow = {"id": "wf-1", "nodes": [], "links": []}
    ok = await _queue(client, txt2img(seed=1), extra_data={"extra_pnginfo": {"workflow": workflow}})
    await wait_done(client, ok)
    bad = await _queue(client, failing())
    await wait_done(client, bad)
    slow = await _queue(client, txt2img(seed=2, steps=40, delay=0.05))
    await wait_running(client, slow)
    waiting = await _queue(client, txt2img(seed=3))

    body = await (await client.get("/api/jobs")).json()
    assert [j["id"] for j in body["jobs"]] == [waiting, slow, bad, ok]  # newest first
    assert body["pagination"] == {"offset": 0, "limit": None, "total": 4, "has_more": False}
    by_id = {j["id"]: j for j in body["jobs"]}
    assert [by_id[i]["status"] for i in (waiting, slow, bad, ok)] == [
        "pending",
        "in_progress",
        "failed",
        "completed",
    ]
    done = by_id[ok]
    assert (
        done["workflow_id"] == "wf-1"
        and done["outputs_count"] == 1
        and done["previewable_outputs_count"] == 1
    )
    assert done["preview_output"]["nodeId"] == "3" and done["preview_output"]["mediaType"] == "images"
    assert done["execution_end_time"] >= done["execution_start_time"] >= done["create_time"] > 0
    assert by_id[bad]["execution_error"]["exception_message"].endswith("boom")
    assert "outputs" not in done and "workflow" not in done  # the list stays light

    finished = await (await client.get("/api/jobs?status=completed,failed&sort_order=asc")).json()
    assert [j["id"] for j in finished["jobs"]] == [ok, bad]
    page = await (await client.get("/api/jobs?limit=2&offset=1")).json()
    assert [j["id"] for j in page["jobs"]] == [slow, bad]
    assert page["pagination"] == {"offset": 1, "limit": 2, "total": 4, "has_more": True}
    only = await (await client.get("/api/jobs?workflow_id=wf-1")).json()
    assert [j["id"] for j in only["jobs"]] == [ok]

    detail = await (await client.get(f"/api/jobs/{ok}")).json()
    assert detail["outputs"]["3"]["images"][0]["filename"].endswith(".png")
    assert detail["execution_status"]["status_str"] == "success"
    assert detail["workflow"]["prompt"]["3"]["class_type"] == "StubSave"
    running = await (await client.get(f"/api/jobs/{slow}")).json()
    assert running["status"] == "in_progress" and running["workflow"]["prompt"]["2"]["inputs"]["seed"] == 2
    missing = await client.get(f"/api/jobs/{uuid.uuid4()}")
    assert missing.status == 404 and await missing.json() == {"error": "Job not found"}

    # Cancel: pending is dequeued, running is interrupted, finished and unknown ids are no-ops.
    assert await (await client.post(f"/api/jobs/{waiting}/cancel")).json() == {"cancelled": True}
    assert await (await client.post(f"/api/jobs/{ok}/cancel")).json() == {"cancelled": False}
    batch = await client.post("/api/jobs/cancel", json={"job_ids": [slow, str(uuid.uuid4())]})
    assert await batch.json() == {"cancelled": True}
    await wait_done(client, slow)
    cancelled = await (await client.get("/api/jobs?status=cancelled")).json()
    assert [j["id"] for j in cancelled["jobs"]] == [slow]
    assert (await (await client.get("/api/jobs?status=pending")).json())["jobs"] == []


@pytest.mark.asyncio
async def test_jobs_refuse_bad_parameters_as_comfyui_does(aiohttp_client: Any, engine: Any) -> None:
    client = await client_for(aiohttp_client, engine)
    for query, message in (
        ("status=done", "Invalid status value(s): done."),
        ("sort_by=name", "sort_by must be"),
        ("sort_order=up", "sort_order must be"),
        ("limit=0", "limit must be a positive integer"),
        ("limit=x", "limit must be an integer"),
        ("offset=x", "offset must be an integer"),
    ):
        reply = await client.get(f"/api/jobs?{query}")
        assert reply.status == 400 and (await reply.json())["error"].startswith(message), query
    bad_ids = await client.post("/api/jobs/cancel", json={"job_ids": ["ABC", 3]})
    assert bad_ids.status == 400 and (await bad_ids.json())["invalid_ids"] == ["ABC", "3"]
    assert (await client.post("/api/jobs/cancel", json={"ids": []})).status == 400
    assert (await client.post("/api/jobs/cancel", data=b"{nope")).status == 400


@pytest.mark.asyncio
async def test_canvas_startup_routes(aiohttp_client: Any, engine: Any) -> None:
    client = await client_for(aiohttp_client, engine)
    features = await (await client.get("/api/features")).json()
    assert features["supports_preview_metadata"] is True and features["node_replacements"] is True
    assert features["assets"] is False and features["max_upload_size"] > 0
    assert await (await client.get("/api/global_subgraphs")).json() == {}
    assert await (await client.get("/api/node_replacements")).json() == {}
    download = await client.post(
        "/api/models/download", json={"models": [{"name": "x.safetensors", "directory": "checkpoints"}]}
    )
    refusal = await download.json()
    assert download.status == 403 and "never downloads" in refusal["error"]["message"]
    assert refusal["error"]["details"] == "x.safetensors"


def test_old_queue_file_gains_job_columns(tmp_path: Path) -> None:
    """A history written before the jobs API is listed after an upgrade (columns added, rows filled)."""
    path = tmp_path / "queue.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE history (seq INTEGER PRIMARY KEY AUTOINCREMENT, prompt_id TEXT UNIQUE NOT NULL, "
        "entry TEXT NOT NULL);"
    )
    entry = {
        "prompt": [1, "p1", {}, {"create_time": 5}, []],
        "outputs": {},
        "status": {"status_str": "success", "completed": True, "messages": []},
    }
    db.execute("INSERT INTO history (prompt_id, entry) VALUES (?, ?)", ("p1", json.dumps(entry)))
    db.commit()
    db.close()
    store = PromptStore(path)
    assert store.job_count(["completed"], None) == 1
    assert store.jobs(["p1"])["p1"] == {
        "id": "p1", "status": "completed", "priority": 1, "create_time": 5,
        "outputs_count": 0, "previewable_outputs_count": 0,
    }  # fmt: skip
    store.close()
