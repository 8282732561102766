"""Prompts per second through the real server with 1 and 2 Ray workers on this machine.

Trivial prompts (an 8x8 EmptyImage saved: the queue, dispatch, Ray and websocket round trip) and
small real prompts (the oracle's mini SD1.5 checkpoint, 64x64, 2 steps, a new seed each so the
sampler always runs). Needs `tests/.cache/mini_sd15.safetensors` (any test run makes it).

    python -m bench.ray_throughput [--trivial 200] [--real 12]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from nodegraph.cli import worker_engine
from nodegraph.engine import Settings
from nodegraph.server.ray_pool import start_ray, worker_factory
from tests.server.live import LiveServer, http_json, wait_history

MINI = Path(__file__).resolve().parent.parent / "tests" / ".cache" / "mini_sd15.safetensors"


def trivial(i: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t", "images": ["1", 0]}},
    }


def real(i: int) -> dict[str, Any]:
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 1000 + i, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "r", "images": ["8", 0]}},
    }  # fmt: skip


def rate(address: str, prompts: list[dict[str, Any]]) -> float:
    """Prompts per second from the first POST to the last history entry."""
    start = time.perf_counter()
    ids = [http_json(address, "/prompt", {"prompt": p})["prompt_id"] for p in prompts]
    for prompt_id in ids:
        entry = wait_history(address, prompt_id, timeout=1800)
        assert entry["status"]["status_str"] == "success", entry["status"]
    return len(ids) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trivial", type=int, default=200)
    parser.add_argument("--real", type=int, default=12)
    args = parser.parse_args(argv)
    start_ray(None, 2)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print("| workers | trivial prompts/s | small real prompts/s |")
    print("| --- | --- | --- |")
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            (base / "models" / "checkpoints").mkdir(parents=True)
            os.symlink(MINI, base / "models" / "checkpoints" / "mini.safetensors")
            engine = worker_engine(Settings(base_directory=base, port=0))
            with LiveServer(engine, workers=worker_factory(engine, worker_engine, workers)) as live:
                rate(live.address, [real(-1 - w) for w in range(workers)])  # every worker loads the model
                trivial_rate = rate(live.address, [trivial(i) for i in range(args.trivial)])
                real_rate = rate(live.address, [real(i) for i in range(args.real)])
        print(f"| {workers} | {trivial_rate:.1f} | {real_rate:.2f} |", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
