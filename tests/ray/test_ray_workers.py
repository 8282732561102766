"""`serve --workers 2` on a local Ray cluster: two CPU workers on the small oracle checkpoint.

One server (and one Ray instance) for the module: startup is tens of seconds on two cores. Checks
routing by model (loads counted per worker), spreading, bit-equal images, the websocket sequence
a third-party client sees, worker death (retry on the other worker, replacement) and the startup
error for an unreachable head.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray  # the optional extra nodegraph[ray]; `make install` installs it for development and CI
from PIL import Image

from nodegraph.cli import worker_engine
from nodegraph.engine import Settings
from nodegraph.server.ray_pool import RayWorkers, start_ray, worker_factory
from tests.server.live import LiveServer, http_json, wait_history
from tests.server.test_live_client import run_like_a_script

pytestmark = pytest.mark.slow


def txt2img(ckpt: str, seed: int, steps: int = 2, prefix: str = "ray") -> dict[str, Any]:
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Path:
    root = tmp_path_factory.mktemp("ray")
    checkpoints = root / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(mini_checkpoint, checkpoints / "mini.safetensors")
    os.symlink(mini_checkpoint, checkpoints / "same_file_other_name.safetensors")
    # a second, different checkpoint: the same weights with one tensor's bytes changed is another model
    data = bytearray(mini_checkpoint.read_bytes())
    data[-2:] = b"\x00\x3c"  # the last fp16 value becomes 1.0
    (checkpoints / "other.safetensors").write_bytes(bytes(data))
    (checkpoints / "broken.safetensors").write_bytes(data[:4096])  # cut short: unreadable
    return root


@pytest.fixture(scope="module")
def server(base: Path) -> Iterator[tuple[LiveServer, RayWorkers]]:
    start_ray(None, 2)
    engine = worker_engine(Settings(base_directory=base, port=0))
    made: list[RayWorkers] = []

    def factory(*args: Any) -> RayWorkers:
        made.append(worker_factory(engine, worker_engine, 2, ship_outputs=True)(*args))
        return made[0]

    with LiveServer(engine, workers=factory) as live:
        yield live, made[0]
    ray.shutdown()


def loads(pool: RayWorkers) -> dict[str, int]:
    return {slot.view.name: slot.info().loads for slot in pool.slots}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_prompts_go_where_their_checkpoint_is_loaded(server: tuple[LiveServer, RayWorkers]) -> None:
    live, pool = server
    first, _, images = run_like_a_script(live.address, txt2img("mini.safetensors", seed=1))
    assert len(images) == 1
    holder = pool.dispatched[first]
    other, _, _ = run_like_a_script(live.address, txt2img("other.safetensors", seed=1))
    assert pool.dispatched[other] != holder  # nobody held it: the empty worker, not the busy cache
    for seed in (2, 3):
        again, _, _ = run_like_a_script(live.address, txt2img("mini.safetensors", seed=seed))
        assert pool.dispatched[again] == holder
    alias, _, _ = run_like_a_script(live.address, txt2img("same_file_other_name.safetensors", seed=4))
    assert pool.dispatched[alias] == holder  # same content hash: the same model
    counted = loads(pool)
    assert counted[holder] >= 1 and counted[pool.dispatched[other]] == 1
    assert sum(counted.values()) <= 3  # mini once, other once (+ the alias file's own read, at most)
    entry = http_json(live.address, f"/history/{first}")[first]
    assert entry["worker"] == holder
    assert http_json(live.address, f"/api/jobs/{first}")["worker"] == holder
    stats = http_json(live.address, "/system_stats")
    assert sorted(w["name"] for w in stats["workers"]) == ["worker-0", "worker-1"]
    assert all(w["pid"] != os.getpid() for w in stats["workers"])


def test_concurrent_prompts_spread_over_both_workers(server: tuple[LiveServer, RayWorkers]) -> None:
    live, pool = server
    ids = [
        http_json(live.address, "/prompt", {"prompt": txt2img(ckpt, seed=10 + i, steps=4, prefix=f"s{i}")})[
            "prompt_id"
        ]
        for i, ckpt in enumerate(["mini.safetensors", "other.safetensors"])
    ]
    entries = [wait_history(live.address, pid, timeout=900) for pid in ids]
    assert all(e["status"]["status_str"] == "success" for e in entries)
    assert {pool.dispatched[i] for i in ids} == {"worker-0", "worker-1"}


def test_image_from_a_worker_equals_the_single_process_image(
    server: tuple[LiveServer, RayWorkers], base: Path, tmp_path: Path
) -> None:
    live, _ = server
    prompt = txt2img("mini.safetensors", seed=77, prefix="bits")
    _, _, images = run_like_a_script(live.address, prompt)
    local = worker_engine(Settings(base_directory=base, output_directory=tmp_path))
    outcome = local.executor.execute(prompt, "local", lambda _e: None)
    assert outcome.status == "success"
    name = outcome.outputs["9"]["images"][0]["filename"]
    assert np.array_equal(pixels(images[0]), pixels((tmp_path / name).read_bytes()))


def test_websocket_sequence_is_the_single_process_one(
    server: tuple[LiveServer, RayWorkers], base: Path, tmp_path: Path
) -> None:
    live, _ = server
    prompt = txt2img("mini.safetensors", seed=91, prefix="ws")
    _, remote, _ = run_like_a_script(live.address, prompt)
    single = worker_engine(Settings(base_directory=base, output_directory=tmp_path, port=0))
    with LiveServer(single) as local:
        _, here, _ = run_like_a_script(local.address, prompt)

    def shape(messages: list[dict[str, Any]]) -> list[str]:
        # which nodes were cached depends on what each engine ran before; the protocol does not
        skip = ("status", "executing", "progress", "progress_state", "execution_cached")
        return [m["type"] for m in messages if m["type"] not in skip]

    def steps(messages: list[dict[str, Any]]) -> list[int]:
        return [m["data"]["value"] for m in messages if m["type"] == "progress"]

    assert shape(remote) == shape(here) == ["execution_start", "executed", "execution_success"]
    assert steps(remote) == steps(here) == [1, 2]
    for messages in (remote, here):
        assert messages[-1]["type"] == "executing" and messages[-1]["data"]["node"] is None
    executed = [m["data"]["output"]["images"][0]["type"] for m in remote if m["type"] == "executed"]
    assert executed == ["output"]


def test_a_model_a_worker_cannot_load_fails_that_prompt_only(server: tuple[LiveServer, RayWorkers]) -> None:
    live, _ = server
    bad = http_json(live.address, "/prompt", {"prompt": txt2img("broken.safetensors", seed=1)})["prompt_id"]
    good = http_json(live.address, "/prompt", {"prompt": txt2img("mini.safetensors", seed=12)})["prompt_id"]
    failed, passed = (
        wait_history(live.address, bad, timeout=900),
        wait_history(live.address, good, timeout=900),
    )
    assert failed["status"]["status_str"] == "error" and passed["status"]["status_str"] == "success"
    error = next(m[1] for m in failed["status"]["messages"] if m[0] == "execution_error")
    assert (
        error["node_type"] == "CheckpointLoaderSimple" and "broken.safetensors" in error["exception_message"]
    )


def test_a_killed_worker_is_replaced_and_its_prompt_retried(server: tuple[LiveServer, RayWorkers]) -> None:
    live, pool = server
    pid_before = {slot.view.name: slot.pid for slot in pool.slots}
    prompt_id = http_json(live.address, "/prompt", {"prompt": txt2img("mini.safetensors", seed=5, steps=40)})[
        "prompt_id"
    ]
    deadline = time.monotonic() + 600
    while prompt_id not in pool.dispatched or not any(s.current_node == "3" for s in pool.slots):
        assert time.monotonic() < deadline, "the prompt never reached the sampler"
        time.sleep(0.05)
    victim = pool.dispatched[prompt_id]
    os.kill(pid_before[victim], signal.SIGKILL)
    entry = wait_history(live.address, prompt_id, timeout=900)
    errors = [m[1].get("exception_message") for m in entry["status"]["messages"] if "error" in m[0]]
    assert entry["status"]["status_str"] == "success", errors
    slot = next(s for s in pool.slots if s.view.name == victim)
    assert slot.pid != pid_before[victim] and slot.info().pid == slot.pid  # a fresh worker answers
    assert [m for m in entry["status"]["messages"] if m[0] == "execution_success"]


def test_second_death_of_the_same_prompt_is_recorded_as_an_error(
    server: tuple[LiveServer, RayWorkers],
) -> None:
    live, pool = server
    prompt_id = http_json(live.address, "/prompt", {"prompt": txt2img("mini.safetensors", seed=6, steps=40)})[
        "prompt_id"
    ]
    killed: list[int] = []

    def kill_whoever_runs_it() -> None:
        deadline = time.monotonic() + 900
        while len(killed) < 2 and time.monotonic() < deadline:
            for slot in pool.slots:
                if slot.running_id == prompt_id and slot.current_node == "3" and slot.pid not in killed:
                    killed.append(slot.pid)
                    os.kill(slot.pid, signal.SIGKILL)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_whoever_runs_it)
    killer.start()
    entry = wait_history(live.address, prompt_id, timeout=900)
    killer.join()
    assert len(killed) == 2
    assert entry["status"]["status_str"] == "error"
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "failed once" in errors[0][1]["exception_message"]
    # the queue goes on: both workers were replaced and still run prompts
    _, _, images = run_like_a_script(live.address, txt2img("mini.safetensors", seed=8))
    assert len(images) == 1


def test_unreachable_head_is_a_clear_startup_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nodegraph", "serve", "--base-directory", str(tmp_path), "--port", "0",
         "--ray-address", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Ray head at 127.0.0.1:1 cannot be reached" in done.stderr and "Traceback" not in done.stderr
