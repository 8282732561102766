"""The real SD nodes behind the real server: ComfyUI's basic txt2img API prompt, driven by a script.

Uses the oracle's tiny random SD1.5-shaped checkpoint; about a minute on two CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from nodegraph.engine import Settings, build_engine
from nodes import all_nodes
from tests.server.live import LiveServer
from tests.server.test_live_client import run_like_a_script


def basic_txt2img(seed: int) -> dict[str, Any]:
    """ComfyUI's `script_examples/basic_api_example.py` graph, shrunk to 64×64 and 2 steps."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }  # fmt: skip


@pytest.mark.slow
def test_script_runs_real_txt2img_and_reruns_only_what_changed(tmp_path: Path, mini_checkpoint: Path) -> None:
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(mini_checkpoint, checkpoints / "mini.safetensors")
    with LiveServer(build_engine(Settings(base_directory=tmp_path, port=0), all_nodes())) as server:
        _, messages, images = run_like_a_script(server.address, basic_txt2img(seed=1))
        assert [m for m in messages if m["type"] == "execution_success"], messages
        assert len(images) == 1 and images[0][:8] == b"\x89PNG\r\n\x1a\n"
        assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2]
        _, messages, images = run_like_a_script(server.address, basic_txt2img(seed=1))
        assert not [m for m in messages if m["type"] == "executing" and m["data"]["node"]]
        assert len(images) == 1  # cached SaveImage still reports its image
        _, messages, images = run_like_a_script(server.address, basic_txt2img(seed=2))
        ran = [m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]]
        assert ran == ["3", "8", "9"] and len(images) == 1
