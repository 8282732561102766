"""Queue and history management routes: delete, clear, order, duplicate ids, interrupt by id."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.server.clients import client_for as _client
from tests.server.clients import wait_done, wait_running
from tests.server.stubs import txt2img

pytestmark = pytest.mark.asyncio


async def test_queue_delete_clear_and_interrupt_by_prompt_id(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    slow = (await (await client.post("/prompt", json={"prompt": txt2img(steps=500, delay=0.01)})).json())[
        "prompt_id"
    ]
    await wait_running(client, slow)
    ids = [
        (await (await client.post("/prompt", json={"prompt": txt2img(seed=s)})).json())["prompt_id"]
        for s in (10, 11, 12)
    ]
    await client.post("/queue", json={"delete": [ids[0]]})
    pending = [i[1] for i in (await (await client.get("/queue")).json())["queue_pending"]]
    assert ids[0] not in pending and ids[1] in pending
    await client.post("/queue", json={"clear": True})
    assert (await (await client.get("/queue")).json())["queue_pending"] == []
    await client.post("/interrupt", json={"prompt_id": "some-other-id"})
    await asyncio.sleep(0.1)
    assert (await (await client.get("/queue")).json())["queue_running"]  # still running: another id
    await client.post("/interrupt", json={"prompt_id": slow})
    assert (await wait_done(client, slow))["status"]["status_str"] == "error"


async def test_history_delete_clear_and_max_items(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    ids = []
    for seed in range(3):
        ids.append(
            (await (await client.post("/prompt?wait=1", json={"prompt": txt2img(seed=seed)})).json())[
                "prompt_id"
            ]
        )
    assert list(await (await client.get("/history?max_items=2")).json()) == ids[1:]
    assert list(await (await client.get("/history?max_items=1&offset=0")).json()) == ids[:1]
    await client.post("/history", json={"delete": [ids[0]]})
    assert list(await (await client.get("/history")).json()) == ids[1:]
    await client.post("/history", json={"clear": True})
    assert await (await client.get("/history")).json() == {}


async def test_front_and_number_order_the_queue(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    slow = (await (await client.post("/prompt", json={"prompt": txt2img(steps=500, delay=0.01)})).json())[
        "prompt_id"
    ]
    await wait_running(client, slow)
    late = (await (await client.post("/prompt", json={"prompt": txt2img(seed=21)})).json())["prompt_id"]
    early = (await (await client.post("/prompt", json={"prompt": txt2img(seed=22), "front": True})).json())[
        "prompt_id"
    ]
    pending = [i[1] for i in (await (await client.get("/queue")).json())["queue_pending"]]
    assert pending == [early, late]
    await client.post(f"/prompt/{slow}/cancel")
    await client.post("/queue", json={"clear": True})


async def test_duplicate_prompt_id_is_refused_while_queued(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    slow = {"prompt": txt2img(steps=500, delay=0.01), "prompt_id": "mine"}
    assert (await (await client.post("/prompt", json=slow)).json())["prompt_id"] == "mine"
    await wait_running(client, "mine")
    again = await client.post("/prompt", json={"prompt": txt2img(), "prompt_id": "mine"})
    assert again.status == 400 and (await again.json())["error"]["type"] == "duplicate_prompt_id"
    await client.post("/prompt/mine/cancel")
    await wait_done(client, "mine")


async def test_run_and_wait_reports_timeout_and_cancel(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    body = {"prompt": txt2img(steps=500, delay=0.01), "prompt_id": "long"}
    timed_out = await client.post("/prompt?wait=true&timeout=0.1", json=body)
    assert timed_out.status == 202 and (await timed_out.json())["status"] == "timeout"
    waiting = asyncio.ensure_future(
        client.post("/prompt?wait=true", json={"prompt": txt2img(seed=77), "prompt_id": "queued"})
    )
    await wait_running(client, "long")
    for _ in range(100):
        if [i[1] for i in (await (await client.get("/queue")).json())["queue_pending"]] == ["queued"]:
            break
        await asyncio.sleep(0.01)
    await client.post("/queue", json={"delete": ["queued"]})
    cancelled = await (await waiting).json()
    assert cancelled["status"] == "cancelled" and cancelled["outputs"] == {} and cancelled["images"] == []
    await client.post("/prompt/long/cancel")
    await wait_done(client, "long")
