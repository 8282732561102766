"""The websocket messages of one prompt, in ComfyUI's order and number, no more.

The expected sequences are read off ComfyUI's code (execution.py `execute` / `execute_async`,
comfy_execution/progress.py `WebUIProgressHandler`, main.py `hijack_progress` / `prompt_worker`):
a node that runs gets `progress_state` (started), `executing`, per step `progress_state` then
`progress`, its `executed` if it shows something, `progress_state` (finished); a cached output node
`executed` and `progress_state`; the end `execution_success`, then `executing` with node null.
`status` (throttled per interval) and nodegraph's own `nodegraph.warning` are left out here.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from nodegraph.node import Int, Node, Output, RunContext, Socket, String
from nodegraph.server import create_app
from nodegraph.types import LATENT
from tests.server.clients import collect_until_done, wait_done
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


class StubSink(Node):
    """An output node that shows nothing (ComfyUI still answers it with `executed`, output null)."""

    CATEGORY = "test"
    OUTPUT_NODE = True
    INPUTS = (Socket("latent", socket_type=LATENT), String("label", ""))
    OUTPUTS = ()

    def run(self, ctx: RunContext, latent: Any, label: str) -> tuple[Any, ...]:
        return ()


class StubGate(Node):
    """Hold the prompt until the test opens `GATE`, without looking for an interrupt meanwhile."""

    CATEGORY = "test"
    INPUTS = (Int("seed", 0, min=0, max=2**32),)
    OUTPUTS = (Output(LATENT),)
    GATE = threading.Event()

    def run(self, ctx: RunContext, seed: int) -> tuple[Any, ...]:
        StubGate.GATE.wait(10)
        return ({"seed": seed},)


def executed_of(frames: list[Any]) -> list[dict[str, Any]]:
    return [f["data"] for f in frames if isinstance(f, dict) and f["type"] == "executed"]


async def test_a_cached_output_node_that_shows_nothing_gets_executed_null(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """execution.py `execute`: a node found in the output cache sends `executed` with its cached UI,
    `None` when it has none, then `finish_progress`; a node that runs and shows nothing sends none."""
    client = await aiohttp_client(create_app(make_engine(tmp_path, more_nodes=(StubSink,))))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive()
    prompt = {
        "1": {"class_type": "StubSeed", "inputs": {"seed": 7}},
        "9": {"class_type": "StubSink", "inputs": {"latent": ["1", 0], "label": "a"}},
    }
    assert executed_of(await run(client, ws, prompt)) == []
    cached = await run(client, ws, prompt)
    assert shown(cached) == ["execution_start", "execution_cached", "executed", *DONE, "execution_success",
                             "executing"]  # fmt: skip
    assert executed_of(cached) == [{"node": "9", "display_node": "9", "output": None, "prompt_id": ANY}]
    assert states_of(cached)[0]["9"]["state"] == "finished"
    await ws.close()


async def test_a_node_made_earlier_in_the_same_prompt_gets_executed(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """Two identical nodes: the second finds the first's output in the cache when its turn comes,
    so, as in ComfyUI, it is not run nor announced with `executing`: `executed` (null) and finished."""
    client = await aiohttp_client(create_app(make_engine(tmp_path, more_nodes=(StubSink,))))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive()
    prompt = {
        "1": {"class_type": "StubSeed", "inputs": {"seed": 7}},
        "5": {"class_type": "StubSeed", "inputs": {"seed": 7}},
        "3": {"class_type": "StubSink", "inputs": {"latent": ["1", 0], "label": "a"}},
        "6": {"class_type": "StubSink", "inputs": {"latent": ["5", 0], "label": "b"}},
    }
    frames = await run(client, ws, prompt)
    announced = [f["data"]["node"] for f in frames if isinstance(f, dict) and f["type"] == "executing"]
    [twin] = {"1", "5"} - set(announced)
    assert executed_of(frames) == [{"node": twin, "display_node": twin, "output": None, "prompt_id": ANY}]
    after = frames.index(next(f for f in frames if isinstance(f, dict) and f["type"] == "executed")) + 1
    assert (
        frames[after]["type"] == "progress_state"
        and frames[after]["data"]["nodes"][twin]["state"] == "finished"
    )
    await ws.close()


async def test_an_interrupt_between_nodes_names_the_node_announced_last(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """ComfyUI sends the next node's `progress_state` and `executing` before `before_node_execution`
    sees the interrupt; `execution_interrupted` then names that node, with ComfyUI's fields, and the
    prompt ends with the queue `status` and `executing` null."""
    StubGate.GATE.clear()
    client = await aiohttp_client(create_app(make_engine(tmp_path, more_nodes=(StubGate,))))
    ws = await client.ws_connect("/ws?clientId=me")
    await ws.receive()
    prompt = {
        "1": {"class_type": "StubGate", "inputs": {"seed": 1}},
        "2": {"class_type": "StubSampler", "inputs": {"latent": ["1", 0], "seed": 1, "steps": 2, "delay": 0}},
        "3": {"class_type": "StubSave", "inputs": {"images": ["2", 0], "filename_prefix": "gate"}},
    }
    body = {"prompt": prompt, "client_id": "me"}
    prompt_id = (await (await client.post("/prompt", json=body)).json())["prompt_id"]
    frames: list[Any] = []
    while not any(
        isinstance(f, dict) and f["type"] == "executing" and f["data"]["node"] == "1" for f in frames
    ):
        frames.append(json.loads((await asyncio.wait_for(ws.receive(), 10)).data))
    await client.post("/interrupt")
    StubGate.GATE.set()
    frames += await collect_until_done(ws, prompt_id)
    assert shown(frames)[-6:] == ["executing", *DONE, *RAN, "execution_interrupted", "executing"]  # 1 ran; 2
    announced = [f["data"]["node"] for f in frames if isinstance(f, dict) and f["type"] == "executing"]
    assert announced == ["1", "2", None]
    [stopped] = [f["data"] for f in frames if isinstance(f, dict) and f["type"] == "execution_interrupted"]
    assert set(stopped) == {"prompt_id", "node_id", "node_type", "executed", "timestamp"}
    assert (stopped["prompt_id"], stopped["node_id"], stopped["node_type"]) == (prompt_id, "2", "StubSampler")
    assert stopped["executed"] == ["1"]
    assert states_of(frames)[-1]["2"]["state"] == "running"  # never marked finished, as in ComfyUI
    await ws.close()


async def test_a_preview_frame_goes_before_progress_with_metadata_and_after_without(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """main.py `hijack_progress`: `update_progress` (-> `progress_state`, then the type-4 frame for a
    client with `supports_preview_metadata`), then `progress`, then the type-1 frame for one without.
    A prompt with no client sends type 1 to every socket (the feature check needs a client id)."""
    client = await aiohttp_client(create_app(make_engine(tmp_path, preview_method="auto")))
    kinds: dict[str, list[Any]] = {}
    for seed, (sid, flags) in enumerate((("new", {"supports_preview_metadata": True}), ("old", {}))):
        ws = await greeted(client, sid, flags)
        frames = [f for f in await run_as(client, ws, txt2img(seed=seed, steps=1), sid) if frame_kind(f)]
        at = next(i for i, f in enumerate(frames) if isinstance(f, bytes))
        kinds[sid] = [
            struct.unpack(">I", frames[at][:4])[0],
            *(frame_kind(f) for f in frames[at - 2 : at + 2]),
        ]
        await ws.close()
    assert kinds["new"] == [4, "executing", "progress_state", "binary", "progress"]
    assert kinds["old"] == [1, "progress_state", "progress", "binary", "progress_state"]  # then node 3 starts

    watcher = await greeted(client, "watcher", {"supports_preview_metadata": True})
    prompt_id = (await (await client.post("/prompt", json={"prompt": txt2img(seed=99, steps=1)})).json())[
        "prompt_id"
    ]
    await wait_done(client, prompt_id)
    binary: list[bytes] = []
    while True:
        try:
            msg = await asyncio.wait_for(watcher.receive(), 0.5)
        except asyncio.TimeoutError:
            break
        if isinstance(msg.data, bytes):
            binary.append(msg.data)
    assert [struct.unpack(">I", b[:4])[0] for b in binary] == [1]
    await watcher.close()


async def greeted(client: Any, sid: str, flags: dict[str, Any]) -> Any:
    """A socket that has sent its feature flags and had the server's back."""
    ws = await client.ws_connect(f"/ws?clientId={sid}")
    await ws.send_str(json.dumps({"type": "feature_flags", "data": flags}))
    while json.loads((await asyncio.wait_for(ws.receive(), 10)).data)["type"] != "feature_flags":
        pass
    return ws


def frame_kind(frame: Any) -> str:
    """`binary`, a message type, or "" for what these sequences leave out."""
    if isinstance(frame, bytes):
        return "binary"
    return "" if frame["type"] in ("status", "nodegraph.warning") else str(frame["type"])


async def run_as(client: Any, ws: Any, prompt: dict[str, Any], sid: str) -> list[Any]:
    body = {"prompt": prompt, "client_id": sid}
    prompt_id = (await (await client.post("/prompt", json=body)).json())["prompt_id"]
    return await collect_until_done(ws, prompt_id)
