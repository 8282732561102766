"""Helpers for driving the app in-process with aiohttp's test client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from nodegraph.server import create_app


async def client_for(aiohttp_client: Any, engine: Any) -> TestClient:
    return await aiohttp_client(create_app(engine))


async def wait_done(client: TestClient, prompt_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll `/history/{id}` until the prompt has left the queue."""
    for _ in range(int(timeout / 0.02)):
        body = await (await client.get(f"/history/{prompt_id}")).json()
        entry = body.get(prompt_id)
        if entry:  # in the history once finished (ComfyUI's rule), `{}` before
            return dict(entry)
        await asyncio.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} did not finish")


async def collect_until_done(ws: Any, prompt_id: str) -> list[Any]:
    """Every frame up to and including `executing` with node null for `prompt_id`."""
    frames: list[Any] = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == WSMsgType.BINARY:
            frames.append(msg.data)
            continue
        assert msg.type == WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        frames.append(data)
        if (
            data["type"] == "executing"
            and data["data"]["node"] is None
            and data["data"]["prompt_id"] == prompt_id
        ):
            return frames


async def wait_running(client: TestClient, prompt_id: str) -> None:
    """Wait until the worker has taken `prompt_id` (so what is queued next stays pending)."""
    for _ in range(500):
        running = (await (await client.get("/queue")).json())["queue_running"]
        if [item[1] for item in running] == [prompt_id]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"prompt {prompt_id} did not start")
