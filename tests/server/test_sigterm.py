"""SIGTERM stops `nodegraph serve` promptly, even in the middle of a long prompt, and loses nothing.

The running prompt is interrupted and put back at the front of the queue; the next start runs it.
A real `nodegraph serve` process on the mini SD1.5 checkpoint, a 10,000-step KSampler.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.server.test_serve_announce import _free_port

pytestmark = pytest.mark.slow
START_LIMIT_S = 600.0  # the warm-up imports torch, diffusers and transformers
STOP_LIMIT_S = 60.0  # torch finishes the step it is in; far less than this on any machine


def _graph() -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1, "steps": 10000, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }  # fmt: skip


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


@contextmanager
def _server(base: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A `nodegraph serve` child; its output goes to a file (a pipe nobody reads would fill and block it)."""
    port = _free_port()
    args = [sys.executable, "-m", "nodegraph", "serve", "--base-directory", str(base), "--port", str(port)]
    log = base / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while b"serving on" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text()[-2000:]
                raise AssertionError(f"the server did not start (rc {proc.poll()}):\n{tail}")
            time.sleep(0.1)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_sampling(port: int, prompt_id: str, deadline_s: float = 300.0) -> None:
    """Until the prompt's KSampler has finished a step (the worker's progress, as A1111's route shows it)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        state = _get(port, "/sdapi/v1/progress")["state"]
        if state["job"] == prompt_id and state["sampling_steps"] == 10000 and state["sampling_step"] >= 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} never reached the sampler's steps")


def _sigterm(proc: subprocess.Popen[bytes]) -> float:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=STOP_LIMIT_S)
    return time.monotonic() - start


def test_sigterm_mid_prompt_stops_the_server_and_the_next_start_runs_the_prompt(
    tmp_path: Path, mini_checkpoint: Path
) -> None:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    with _server(tmp_path) as (proc, port):
        body = json.dumps({"prompt": _graph(), "prompt_id": "long-one"}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/prompt", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
        _wait_sampling(port, "long-one")  # SIGTERM arrives inside the sampler's steps
        took = _sigterm(proc)
        assert proc.returncode == 0, proc.returncode
        assert took < STOP_LIMIT_S
    with _server(tmp_path) as (proc, port):
        queue = _get(port, "/queue")
        held = [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
        assert held == ["long-one"]  # put back at the front, not lost and not marked failed
        assert _get(port, "/history/long-one") == {}  # not filed as interrupted or failed
        assert _get(port, "/api/jobs/long-one")["status"] in ("pending", "in_progress")
        _sigterm(proc)
        assert proc.returncode == 0


def test_a_worker_stuck_inside_a_node_does_not_keep_the_stopped_server_alive() -> None:
    """After the shutdown's wait, a worker thread still in a node ends with the process, exit 0."""
    code = (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(600,), name='nodegraph-worker', daemon=True).start()\n"
        "from nodegraph.server import _exit_if_a_worker_is_stuck\n"
        "_exit_if_a_worker_is_stuck()\n"
        "raise SystemExit(3)  # not reached: the stuck worker ends the process at once\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nodegraph-worker still inside a node" in done.stderr
