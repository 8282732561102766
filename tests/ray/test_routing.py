"""The routing policy and model identity, without Ray: which idle worker a prompt goes to."""

from __future__ import annotations

import os
from pathlib import Path

from nodegraph.server.routing import (
    ContentHashes,
    WorkerView,
    choose_worker,
    referenced_models,
    round_robin,
)


def test_prompt_goes_to_the_idle_worker_holding_its_checkpoint() -> None:
    a, b = WorkerView("a"), WorkerView("b")
    a.remember({"ckpt-x": 100})
    b.remember({"ckpt-y": 100})
    assert choose_worker({"ckpt-y": 100}, [a, b]) is b
    assert choose_worker({"ckpt-x": 100, "lora": 1}, [a, b]) is a


def test_checkpoint_outweighs_loras_and_an_empty_worker_beats_a_busy_cache() -> None:
    a, b, c = WorkerView("a"), WorkerView("b"), WorkerView("c")
    a.remember({"ckpt-x": 100})
    b.remember({"lora-1": 1, "lora-2": 1})
    assert choose_worker({"ckpt-x": 100, "lora-1": 1, "lora-2": 1}, [a, b, c]) is a
    assert choose_worker({"ckpt-new": 100}, [a, b, c]) is c  # nobody holds it: the empty worker


def test_a_busy_holder_takes_one_prompt_behind_its_run_then_others_are_used() -> None:
    a, b = WorkerView("a", load=1), WorkerView("b")
    a.remember({"ckpt-x": 100})
    assert choose_worker({"ckpt-x": 100}, [a, b]) is a  # one run's wait beats a second load
    a.load = 2
    assert choose_worker({"ckpt-x": 100}, [a, b]) is b  # its backlog is full: the idle worker
    assert choose_worker({"lora-only": 1}, [a, b]) is b  # a LoRA alone does not pull to a busy worker
    b.load = 1
    assert choose_worker({"ckpt-y": 100}, [a, b]) is None
    assert round_robin([a, b], [0]) is None


def test_worker_forgets_its_oldest_model_past_its_capacity() -> None:
    w = WorkerView("a", capacity=2)
    for key in ("x", "y", "x", "z"):
        w.remember({key: 100})
    assert list(w.holds) == ["x", "z"]


def test_models_named_by_a_prompt() -> None:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl/a.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "b.safetensors", "model": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "ckpt_name", "clip": ["1", 1]}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "None"}},
    }
    assert referenced_models(prompt) == [("checkpoints", "sdxl/a.safetensors"), ("loras", "b.safetensors")]


def test_same_content_under_two_names_is_one_model(tmp_path: Path) -> None:
    first, copy, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    first.write_bytes(b"weights" * 1000)
    copy.write_bytes(b"weights" * 1000)
    other.write_bytes(b"weightz" * 1000)
    os.symlink(first, tmp_path / "link.safetensors")
    hashes = ContentHashes()
    resolve = {"a": first, "b": copy, "c": other, "link": tmp_path / "link.safetensors"}
    models = hashes.models([("checkpoints", n) for n in resolve], lambda _folder, name: resolve[name])
    assert len(models) == 2 and set(models.values()) == {100}
    assert hashes.of(first) == hashes.of(copy) == hashes.of(tmp_path / "link.safetensors") != hashes.of(other)
    missing = hashes.models([("loras", "gone")], lambda _f, _n: (_ for _ in ()).throw(FileNotFoundError()))
    assert missing == {}
