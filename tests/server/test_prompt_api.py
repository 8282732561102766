"""The prompt routes in-process (aiohttp's test client): queue, history, websocket messages, cancel, wait."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest

from tests.server.clients import client_for as _client
from tests.server.clients import collect_until_done, wait_done, wait_running
from tests.server.stubs import RUNS, txt2img

pytestmark = pytest.mark.asyncio


async def test_post_prompt_runs_and_files_history(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    resp = await client.post("/prompt", json={"prompt": txt2img(), "client_id": "c1"})
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"prompt_id", "number", "node_errors"}
    entry = await wait_done(client, body["prompt_id"])
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert entry["outputs"]["3"]["images"][0]["type"] == "output"
    number, pid, prompt, extra, outputs = entry["prompt"]
    assert pid == body["prompt_id"] and extra["client_id"] == "c1" and outputs == ["3"]
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert kinds[0] == "execution_start" and "execution_cached" in kinds and kinds[-1] == "execution_success"
    assert "nodegraph.warning" in kinds
    assert entry["meta"]["3"]["node_id"] == "3"


async def test_api_prefix_serves_the_same_routes(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    for path in (
        "/prompt",
        "/queue",
        "/history",
        "/object_info",
        "/system_stats",
        "/features",
        "/models",
        "/embeddings",
        "/settings",
        "/users",
        "/extensions",
    ):
        plain = await client.get(path)
        api = await client.get("/api" + path)
        assert plain.status == api.status == 200, path


async def test_invalid_prompt_is_400_with_node_errors(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    bad = txt2img()
    bad["2"]["inputs"]["steps"] = 0
    resp = await client.post("/prompt", json={"prompt": bad})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] and "2" in body["node_errors"]
    assert (await client.post("/prompt", json={"nothing": 1})).status == 400
    no_prompt = await (await client.post("/prompt", json={})).json()
    assert no_prompt["error"]["type"] == "no_prompt"
    malformed = await client.post("/prompt", data=b"{not json", headers={"Content-Type": "application/json"})
    assert malformed.status == 400 and (await malformed.json())["error"]["type"] == "invalid_json"
    unknown = await client.post("/prompt", json={"prompt": {"1": {"class_type": "Nope", "inputs": {}}}})
    assert unknown.status == 400


async def test_websocket_messages_follow_the_prompt(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    ws = await client.ws_connect("/ws?clientId=me")
    hello = json.loads((await ws.receive()).data)
    assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "me"}}
    await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
    flags = json.loads((await ws.receive()).data)
    assert flags["type"] == "feature_flags" and flags["data"]["supports_preview_metadata"] is True
    # The canvas asks for previews with its "Live preview method" setting; the server sends none by default.
    body = {"prompt": txt2img(steps=3), "client_id": "me", "extra_data": {"preview_method": "auto"}}
    pid = (await (await client.post("/prompt", json=body)).json())["prompt_id"]
    frames = await collect_until_done(ws, pid)
    texts = [f for f in frames if isinstance(f, dict)]
    kinds = [f["type"] for f in texts]
    for kind in (
        "execution_start",
        "execution_cached",
        "executing",
        "progress",
        "progress_state",
        "executed",
        "execution_success",
        "nodegraph.warning",
    ):
        assert kind in kinds, kind
    executing = [f["data"] for f in texts if f["type"] == "executing" and f["data"]["node"]]
    assert [e["node"] for e in executing] == ["1", "2", "3"]
    assert all(e["display_node"] == e["node"] and e["prompt_id"] == pid for e in executing)
    progress = [f["data"] for f in texts if f["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "2"), (2, 3, "2"), (3, 3, "2")]
    executed = next(f["data"] for f in texts if f["type"] == "executed")
    assert executed["node"] == "3" and executed["output"]["images"][0]["filename"].endswith(".png")
    binary = [f for f in frames if isinstance(f, bytes)]
    assert len(binary) == 1
    kind, meta_len = struct.unpack(">II", binary[0][:8])
    meta = json.loads(binary[0][8 : 8 + meta_len])
    assert kind == 4 and meta["node_id"] == "2" and meta["image_type"] == "image/jpeg"
    assert binary[0][8 + meta_len : 8 + meta_len + 2] == b"\xff\xd8"  # JPEG data follows the metadata
    await ws.close()


async def test_preview_without_metadata_flag_is_type_1(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    ws = await client.ws_connect("/ws?clientId=old")
    await ws.receive()
    body = {"prompt": txt2img(), "client_id": "old", "extra_data": {"preview_method": "latent2rgb"}}
    pid = (await (await client.post("/prompt", json=body)).json())["prompt_id"]
    frames = await collect_until_done(ws, pid)
    binary = [f for f in frames if isinstance(f, bytes)]
    assert struct.unpack(">II", binary[0][:8]) == (1, 1) and binary[0][8:10] == b"\xff\xd8"


async def test_no_preview_frames_unless_the_server_or_the_client_asked(
    aiohttp_client: Any, tmp_path: Any
) -> None:
    """A client that never asked gets text messages only (ComfyUI's `--preview-method none` default);
    `"default"` means the server's method; the server's `--preview-method` turns them on for everyone."""
    from tests.server.stubs import make_engine

    for method, asked, expected in (("none", None, 0), ("none", "default", 0), ("auto", None, 1)):
        engine = make_engine(tmp_path / f"{method}-{asked}", preview_method=method)
        client = await _client(aiohttp_client, engine)
        ws = await client.ws_connect("/ws?clientId=script")
        await ws.receive()
        extra = {} if asked is None else {"preview_method": asked}
        body = {"prompt": txt2img(), "client_id": "script", "extra_data": extra}
        pid = (await (await client.post("/prompt", json=body)).json())["prompt_id"]
        frames = await collect_until_done(ws, pid)
        assert len([f for f in frames if isinstance(f, bytes)]) == expected, (method, asked)
        await ws.close()


async def test_messages_go_only_to_the_prompts_client(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    mine, other = await client.ws_connect("/ws?clientId=a"), await client.ws_connect("/ws?clientId=b")
    await mine.receive()
    await other.receive()
    pid = (await (await client.post("/prompt", json={"prompt": txt2img(), "client_id": "a"})).json())[
        "prompt_id"
    ]
    await collect_until_done(mine, pid)
    await wait_done(client, pid)
    await asyncio.sleep(0.1)
    seen = []
    while True:
        try:
            msg = await asyncio.wait_for(other.receive(), 0.2)
        except asyncio.TimeoutError:
            break
        seen.append(json.loads(msg.data)["type"])
    assert seen and set(seen) == {"status"}  # the queue size goes to all, the run to its client only


async def test_resubmit_is_cached_and_new_seed_reruns_sampler_and_save(
    aiohttp_client: Any, engine: Any
) -> None:
    client = await _client(aiohttp_client, engine)
    first = (await (await client.post("/prompt", json={"prompt": txt2img(seed=1)})).json())["prompt_id"]
    await wait_done(client, first)
    assert RUNS == {"StubSeed": 1, "StubSampler": 1, "StubSave": 1}
    again = (await (await client.post("/prompt", json={"prompt": txt2img(seed=1)})).json())["prompt_id"]
    entry = await wait_done(client, again)
    assert RUNS == {"StubSeed": 1, "StubSampler": 1, "StubSave": 1}
    cached = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_cached")
    assert sorted(cached["nodes"]) == ["1", "2", "3"] and "3" in entry["outputs"]
    new_seed = (await (await client.post("/prompt", json={"prompt": txt2img(seed=2)})).json())["prompt_id"]
    await wait_done(client, new_seed)
    assert RUNS == {"StubSeed": 1, "StubSampler": 2, "StubSave": 2}


async def test_failing_node_does_not_stop_the_worker(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    fail = {"1": {"class_type": "StubFail", "inputs": {"message": "no luck"}}}
    bad = (await (await client.post("/prompt", json={"prompt": fail})).json())["prompt_id"]
    entry = await wait_done(client, bad)
    assert entry["status"] == {**entry["status"], "status_str": "error", "completed": False}
    err = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert (
        err["node_id"] == "1"
        and err["exception_type"] == "RuntimeError"
        and "no luck" in err["exception_message"]
    )
    good = (await (await client.post("/prompt", json={"prompt": txt2img()})).json())["prompt_id"]
    assert (await wait_done(client, good))["status"]["status_str"] == "success"


async def test_run_and_wait_returns_outputs(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    resp = await client.post("/prompt?wait=true", json={"prompt": txt2img(seed=5)})
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "success"
    assert body["outputs"]["3"]["images"][0]["filename"] == "stub_7_5_.png"
    url = body["images"][0]
    assert url.startswith("/view?") and "stub_7_5_.png" in url
    image = await client.get(url)
    assert image.status == 200 and (await image.read())[:4] == b"\x89PNG"


async def test_history_holds_a_prompt_only_once_finished(aiohttp_client: Any, engine: Any) -> None:
    """ComfyUI's `/history/{id}` is `{}` while the prompt is queued or running (clients poll it until
    the id appears, then read the outputs); `/api/jobs/{id}` tells pending from running."""
    client = await _client(aiohttp_client, engine)
    slow = (await (await client.post("/prompt", json={"prompt": txt2img(steps=500, delay=0.01)})).json())[
        "prompt_id"
    ]
    await wait_running(client, slow)
    queued = (await (await client.post("/prompt", json={"prompt": txt2img(seed=9)})).json())["prompt_id"]
    assert await (await client.get(f"/history/{slow}")).json() == {}
    assert await (await client.get(f"/api/history/{queued}")).json() == {}
    assert (await (await client.get(f"/api/jobs/{slow}")).json())["status"] == "in_progress"
    assert (await (await client.get(f"/api/jobs/{queued}")).json())["status"] == "pending"
    assert slow not in await (await client.get("/history")).json()
    queue = await (await client.get("/queue")).json()
    assert [i[1] for i in queue["queue_running"]] == [slow] and [i[1] for i in queue["queue_pending"]] == [
        queued
    ]
    assert await (await client.get("/history/no-such-id")).json() == {}
    assert (await (await client.get("/prompt")).json())["exec_info"]["queue_remaining"] == 2
    await client.post(f"/prompt/{slow}/cancel")
    done = await wait_done(client, queued)
    assert done["status"]["status_str"] == "success" and done["outputs"]


async def test_cancel_pending_and_running_by_id(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    slow = (await (await client.post("/prompt", json={"prompt": txt2img(steps=500, delay=0.01)})).json())[
        "prompt_id"
    ]
    queued = (await (await client.post("/prompt", json={"prompt": txt2img(seed=3)})).json())["prompt_id"]
    cancel = await client.post(f"/prompt/{queued}/cancel")
    assert (await cancel.json())["cancelled"] == "pending"
    for _ in range(200):
        if (await (await client.get("/queue")).json())["queue_running"]:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    cancel = await client.post(f"/prompt/{slow}/cancel")
    assert (await cancel.json())["cancelled"] == "running"
    entry = await wait_done(client, slow)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    assert await (await client.get(f"/history/{queued}")).json() == {}
    assert (await client.post("/prompt/unknown/cancel")).status == 404


async def test_ui_workflow_is_accepted_and_kept_in_extra_pnginfo(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    workflow = {
        "last_node_id": 3,
        "last_link_id": 2,
        "version": 0.4,
        "nodes": [
            {
                "id": 1,
                "type": "StubSeed",
                "mode": 0,
                "inputs": [],
                "widgets_values": [7],
                "outputs": [{"name": "LATENT", "type": "LATENT", "links": [1]}],
            },
            {
                "id": 2,
                "type": "StubSampler",
                "mode": 0,
                "widgets_values": [4, 2, 0.0],
                "inputs": [{"name": "latent", "type": "LATENT", "link": 1}],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2]}],
            },
            {
                "id": 3,
                "type": "StubSave",
                "mode": 0,
                "widgets_values": ["ui"],
                "inputs": [{"name": "images", "type": "IMAGE", "link": 2}],
                "outputs": [],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "IMAGE"]],
    }
    resp = await client.post("/prompt?wait=true", json={"prompt": workflow})
    body = await resp.json()
    assert resp.status == 200, body
    assert body["status"] == "success" and body["outputs"]["3"]["images"][0]["filename"] == "ui_7_4_.png"
    entry = (await (await client.get(f"/history/{body['prompt_id']}")).json())[body["prompt_id"]]
    assert entry["prompt"][3]["extra_pnginfo"]["workflow"]["nodes"][0]["type"] == "StubSeed"
    assert entry["prompt"][2]["2"]["inputs"]["latent"] == ["1", 0]


async def test_sensitive_extra_data_is_not_shown(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    extra = {"api_key_comfy_org": "secret", "extra_pnginfo": {}}
    body = await (await client.post("/prompt?wait=1", json={"prompt": txt2img(), "extra_data": extra})).json()
    entry = (await (await client.get(f"/history/{body['prompt_id']}")).json())[body["prompt_id"]]
    assert "api_key_comfy_org" not in entry["prompt"][3]


async def test_reconnecting_client_hears_the_running_node(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    body = {"prompt": txt2img(steps=500, delay=0.01), "client_id": "back"}
    first_socket = await client.ws_connect("/ws?clientId=back")
    pid = (await (await client.post("/prompt", json=body)).json())["prompt_id"]
    while True:  # the sampler is running once its first progress arrives
        message = json.loads((await asyncio.wait_for(first_socket.receive(), 30)).data)
        if message["type"] == "progress":
            break
    await first_socket.close()  # a page reload: the same clientId reconnects
    ws = await client.ws_connect("/ws?clientId=back")
    first = json.loads((await ws.receive()).data)
    second = json.loads((await ws.receive()).data)
    assert first["type"] == "status" and first["data"]["status"]["exec_info"]["queue_remaining"] == 1
    assert (
        second["type"] == "executing" and second["data"]["node"] == "2" and second["data"]["prompt_id"] == pid
    )
    await client.post("/interrupt")
    await wait_done(client, pid)
    await ws.close()
