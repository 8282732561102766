"""A real server on a loopback port, driven the way third-party ComfyUI clients drive ComfyUI.

The client is `websocket-client` plus `urllib`, as in ComfyUI's own
`script_examples/websockets_api_example.py`: connect `/ws?clientId=`, POST `/prompt` with that
client id, read the socket until `executing` with `node: null`, then GET `/history/{id}` and `/view`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import websocket

from nodegraph.server.app import QUEUE_FILE
from tests.server.live import LiveServer, http_json, wait_history
from tests.server.stubs import RUNS, make_engine, txt2img


def run_like_a_script(address: str, prompt: dict[str, Any]) -> tuple[str, list[dict[str, Any]], list[bytes]]:
    """Queue `prompt`, follow it on the socket, download its images. Returns (prompt id, messages, images)."""
    client_id = str(uuid.uuid4())
    ws = websocket.WebSocket()
    ws.connect(f"ws://{address}/ws?clientId={client_id}")
    try:
        prompt_id = http_json(address, "/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        messages = []
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                messages.append(message)
                data = message["data"]
                if message["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                    break
    finally:
        ws.close()
    history = http_json(address, f"/history/{prompt_id}")[prompt_id]
    images = []
    for output in history["outputs"].values():
        for image in output.get("images", []):
            query = urllib.parse.urlencode(
                {"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]}
            )
            with urllib.request.urlopen(f"http://{address}/view?{query}") as response:
                images.append(response.read())
    return prompt_id, messages, images


def test_third_party_client_runs_follows_and_downloads(tmp_path: Path) -> None:
    RUNS.clear()
    with LiveServer(make_engine(tmp_path)) as server:
        prompt_id, messages, images = run_like_a_script(server.address, txt2img(seed=3, steps=4))
        kinds = [m["type"] for m in messages]
        assert kinds[0] == "status" and messages[0]["data"]["sid"]
        assert kinds.count("progress") == 4 and "executed" in kinds and "execution_success" in kinds
        assert len(images) == 1 and images[0][:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "output" / "stub_7_3_.png").read_bytes() == images[0]
        # The same prompt again re-runs nothing; a new seed re-runs only the sampler and what follows.
        _, messages, _ = run_like_a_script(server.address, txt2img(seed=3, steps=4))
        assert not [m for m in messages if m["type"] == "executing" and m["data"]["node"]]
        _, messages, images = run_like_a_script(server.address, txt2img(seed=4, steps=4))
        ran = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
        assert ran == ["2", "3"] and len(images) == 1
    assert RUNS == {"StubSeed": 1, "StubSampler": 2, "StubSave": 2}


def test_restart_keeps_history_and_resumes_the_queue(tmp_path: Path) -> None:
    server = LiveServer(make_engine(tmp_path)).start()
    try:
        done = http_json(server.address, "/prompt?wait=true", {"prompt": txt2img(seed=1)})["prompt_id"]
        slow = http_json(server.address, "/prompt", {"prompt": txt2img(seed=2, steps=400, delay=0.01)})[
            "prompt_id"
        ]
        pending = [
            http_json(server.address, "/prompt", {"prompt": txt2img(seed=s)})["prompt_id"] for s in (5, 6)
        ]
        for _ in range(500):
            if http_json(server.address, "/queue")["queue_running"]:
                break
    finally:
        server.stop()  # stops while `slow` runs: it must be queued again, not lost
    with LiveServer(make_engine(tmp_path)) as again:
        assert http_json(again.address, f"/history/{done}")[done]["status"]["status_str"] == "success"
        for prompt_id in (slow, *pending):
            assert wait_history(again.address, prompt_id)["status"]["status_str"] == "success"
        assert list(http_json(again.address, "/history")) == [done, slow, *pending]


def test_prompt_running_when_the_process_died_is_requeued(tmp_path: Path) -> None:
    with LiveServer(make_engine(tmp_path)) as server:
        prompt_id = http_json(server.address, "/prompt?wait=1", {"prompt": txt2img(seed=8)})["prompt_id"]
        http_json(server.address, "/history", {"delete": [prompt_id]})
    # What a killed process leaves behind: a queue row still marked running.
    db = sqlite3.connect(tmp_path / "user" / QUEUE_FILE)
    db.execute(
        "INSERT INTO queue (prompt_id, number, prompt, extra_data, outputs, state, attempts) "
        "VALUES ('crashed', 1, ?, '{}', '[\"3\"]', 'running', 1)",
        (json.dumps(txt2img(seed=9)),),
    )
    db.commit()
    db.close()
    with LiveServer(make_engine(tmp_path)) as server:
        assert wait_history(server.address, "crashed")["status"]["status_str"] == "success"


def test_many_clients_many_prompts_every_history_present(tmp_path: Path) -> None:
    """A small, bounded version of bench/load.py: 10 sockets, 50 prompts from 5 threads."""
    with LiveServer(make_engine(tmp_path)) as server:
        sockets = []
        for i in range(10):
            ws = websocket.WebSocket()
            ws.connect(f"ws://{server.address}/ws?clientId=c{i}")
            sockets.append(ws)
        ids: list[str] = []
        lock = threading.Lock()

        def submit(worker: int) -> None:
            for k in range(10):
                body = {"prompt": txt2img(seed=worker * 100 + k, steps=1), "client_id": f"c{worker}"}
                prompt_id = http_json(server.address, "/prompt", body)["prompt_id"]
                with lock:
                    ids.append(prompt_id)

        threads = [threading.Thread(target=submit, args=(w,)) for w in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for prompt_id in ids:
            assert wait_history(server.address, prompt_id)["status"]["status_str"] == "success"
        assert len(http_json(server.address, "/history")) == 50 == len(set(ids))
        for ws in sockets:
            ws.close()
