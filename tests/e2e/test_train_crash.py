"""A server killed (SIGKILL) during a queued training run: the finished epoch files stay whole, and
after a restart the run is in the history as failed, naming them, instead of starting again."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from safetensors import safe_open

from nodegraph.testing import free_port
from tests.e2e.conftest import ROOT, server_command


def _base(tmp_path: Path, mini_checkpoint: Path) -> Path:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "loras").mkdir(parents=True)
    shutil.copy(mini_checkpoint, tmp_path / "models" / "checkpoints" / "mini.safetensors")
    folder = tmp_path / "input" / "set" / "img" / "1_zzkx cube"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path


def _start(base: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(base / f"server-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(server_command(base, port), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300  # importing torch on a loaded 2-core machine
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/queue", timeout=5):
                return proc
        except OSError:
            assert proc.poll() is None, Path(log.name).read_text(errors="replace")[-3000:]
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the server did not start")


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
        return json.loads(reply.read())


def _queue_training(port: int) -> str:
    inputs = {
        "ckpt_name": "mini.safetensors", "dataset": "set/img", "reg_dataset": "none", "output_name": "crash",
        "epochs": 1000, "save_every_n_epochs": 1, "network_dim": 2, "network_alpha": 1.0,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant", "optimizer_type": "AdamW", "train_batch_size": 1, "resolution": "64,64",
        "mixed_precision": "no", "train_unet_only": True, "seed": 0, "sample_prompts": "",
        "sample_every_n_epochs": 0, "extra_options": "",
    }  # fmt: skip
    body = json.dumps({"prompt": {"t": {"class_type": "TrainLora", "inputs": inputs}}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/prompt", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return str(json.loads(reply.read())["prompt_id"])


def test_killed_server_keeps_epoch_files_and_reports_the_run_failed(
    tmp_path: Path, mini_checkpoint: Path
) -> None:
    base = _base(tmp_path, mini_checkpoint)
    loras = base / "models" / "loras"
    port = free_port()
    proc = _start(base, port)
    try:
        prompt_id = _queue_training(port)
        deadline = time.monotonic() + 600
        while not (loras / "crash-000001.safetensors").exists():
            assert time.monotonic() < deadline, "no epoch file within 10 minutes"
            assert proc.poll() is None, "the server died on its own"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup of any kind runs
        proc.wait()
    kept = sorted(p.name for p in loras.glob("crash*.safetensors"))
    assert kept[0] == "crash-000001.safetensors" and "crash.safetensors" not in kept
    for name in kept:  # every file there is whole: it loads, with its own epoch in the metadata
        with safe_open(str(loras / name), "pt") as f:
            epoch = int(name.removesuffix(".safetensors").rsplit("-", 1)[1])
            assert f.metadata()["ss_epoch"] == str(epoch)
            assert len(list(f.keys())) > 0

    proc = _start(base, port)
    try:
        entry = _get(port, f"/api/history/{prompt_id}")[prompt_id]
        assert entry["status"]["status_str"] == "error"
        kind, data = entry["status"]["messages"][-1]
        assert kind == "execution_error" and data["node_type"] == "TrainLora" and data["node_id"] == "t"
        message = data["exception_message"]
        assert message.startswith("the server stopped while this training ran")
        assert f"kept: {', '.join(kept)}" in message and "--network_weights" in message
        queue = _get(port, "/api/queue")
        assert queue["queue_running"] == [] and queue["queue_pending"] == []  # not started again
        job = _get(port, f"/api/jobs/{prompt_id}")
        assert job["status"] == "failed"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
