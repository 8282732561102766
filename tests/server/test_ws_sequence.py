"""The websocket messages of one prompt, in ComfyUI's order and number, no more.

The expected sequences are read off ComfyUI's code (execution.py `execute` / `execute_async`,
comfy_execution/progress.py `WebUIProgressHandler`, main.py `hijack_progress` / `prompt_worker`):
a node that runs gets `progress_state` (started), `executing`, per step `progress_state` then
`progress`, its `executed` if it shows something, `progress_state` (finished); a cached output node
`executed` and `progress_state`; the end `execution_success`, then `executing` with node null.
`status` (throttled per interval) and nodegraph's own `nodegraph.warning` are left out here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodegraph.server import create_app
from tests.server.clients import collect_until_done
from tests.server.stubs import make_engine, txt2img

pytestmark = pytest.mark.asyncio
RAN = ["progress_state", "executing"]  # a node starts
DONE = ["progress_state"]  # a node finishes


def shown(frames: list[Any]) -> list[str]:
    left_out = ("status", "nodegraph.warning")
    return [f["type"] for f in frames if isinstance(f, dict) and f["type"] not in left_out]


def states_of(frames: list[Any]) -> list[dict[str, Any]]:
    return [f["data"]["nodes"] for f in frames if isinstance(f, dict) and f["type"] == "progress_state"]


async def run(client: Any, ws: Any, prompt: dict[str, Any]) -> list[Any]:
    body = {"prompt": prompt, "client_id": "me"}
    prompt_id = (await (await client.post("/prompt", json=body)).json())["prompt_id"]
    return await collect_until_done(ws, prompt_id)


async def test_the_messages_are_comfyuis_in_order_and_number(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_engine(tmp_path)))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive()  # the greeting status
    first = await run(client, ws, txt2img(seed=4, steps=2))
    step = ["progress_state", "progress"]
    assert shown(first) == [
        "execution_start", "execution_cached",
        *RAN, *DONE,  # 1 StubSeed
        *RAN, *step, *step, *DONE,  # 2 StubSampler, two steps
        *RAN, "executed", *DONE,  # 3 StubSave
        "execution_success", "executing",
    ]  # fmt: skip
    states = states_of(first)
    assert states[0] == {"1": {**states[0]["1"], "state": "running", "value": 0, "max": 1}}
    assert {n: (s["state"], s["value"], s["max"]) for n, s in states[-1].items()} == {
        "1": ("finished", 1, 1),
        "2": ("finished", 2, 2),
        "3": ("finished", 1, 1),
    }
    assert len(states) == len({repr(s) for s in states})  # every one says something new

    cached = await run(client, ws, txt2img(seed=4, steps=2))
    assert shown(cached) == ["execution_start", "execution_cached", "executed", *DONE, "execution_success",
                             "executing"]  # fmt: skip
    [cached_state] = states_of(cached)
    assert cached_state == {"3": {**cached_state["3"], "state": "finished", "value": 1, "max": 1}}
    await ws.close()


async def test_a_failing_node_is_never_marked_finished(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(make_engine(tmp_path)))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive()
    frames = await run(client, ws, {"9": {"class_type": "StubFail", "inputs": {"message": "no"}}})
    assert shown(frames) == ["execution_start", "execution_cached", *RAN, "execution_error", "executing"]
    [state] = states_of(frames)
    assert state["9"]["state"] == "running"
    await ws.close()


async def test_the_queue_status_comes_before_the_done_signal(aiohttp_client: Any, tmp_path: Path) -> None:
    """main.py files the prompt (`task_done` -> `status`) before it sends `executing` null; with the
    status interval passed, that is the order a client sees."""
    client = await aiohttp_client(create_app(make_engine(tmp_path)))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive()
    frames = await run(client, ws, txt2img(seed=8, steps=3, delay=0.15))  # longer than the interval
    kinds = [f["type"] for f in frames if isinstance(f, dict)]
    assert kinds[-2:] == ["status", "executing"]
    assert frames[-2]["data"]["status"]["exec_info"]["queue_remaining"] == 0
    await ws.close()
