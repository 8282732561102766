"""TrainLora through the prompt path: validated, run by the executor, progress per step, the LoRA
listed at once, an interrupt keeps the finished epoch files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from nodegraph.engine import Settings, build_engine
from nodegraph.events import Event, Progress
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.train_node import extra_flags

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(tmp_path: Path, mini_checkpoint: Path) -> Path:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    folder = tmp_path / "input" / "lisa" / "img" / "4_lisabp woman"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return tmp_path


def _prompt(**over: Any) -> dict[str, Any]:
    inputs = {
        "ckpt_name": "mini.safetensors", "dataset": "lisa/img", "reg_dataset": "none",
        "output_name": "canvas",
        "epochs": 2, "save_every_n_epochs": 1, "network_dim": 2, "network_alpha": 1.0, "learning_rate": 1e-3,
        "lr_scheduler": "cosine", "optimizer_type": "AdamW", "train_batch_size": 8, "resolution": "64,64",
        "mixed_precision": "no", "train_unet_only": True, "seed": 0,
        "sample_prompts": "lisabp woman --w 64 --h 64 --s 1 --d 3", "sample_every_n_epochs": 2,
        "extra_options": "--cache_latents false",
    } | over  # fmt: skip
    return {"train": {"class_type": "TrainLora", "inputs": inputs}}


def test_a_queued_training_prompt_reports_progress_and_lists_the_lora(
    tmp_path: Path, mini_checkpoint: Path
) -> None:
    engine = build_engine(Settings(base_directory=_base(tmp_path, mini_checkpoint)), all_nodes())
    checked = validate_prompt(_prompt(), engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    events: list[Event] = []
    outcome = engine.executor.execute(checked.prompt, "p1", events.append, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    assert [(e.value, e.max) for e in events if isinstance(e, Progress)] == [
        (1, 2),
        (2, 2),
    ]  # 8 images, batch 8
    assert engine.env.folders.list("loras") == ["canvas-000001.safetensors", "canvas.safetensors"]
    shown = [entry["filename"] for entry in outcome.outputs["train"]["images"]]
    assert shown[0] == "loss.png" and shown[1].startswith("canvas_e000002_00_")
    # interrupted during its second epoch: the first epoch's file stays, complete
    checked = validate_prompt(_prompt(output_name="cut"), engine.registry, engine.env)
    calls = {"n": 0}

    def interrupt_after_step_one(event: Event) -> None:  # the stop is seen at step two's report
        if isinstance(event, Progress):
            calls["n"] += 1
            engine.executor.interrupt()

    outcome = engine.executor.execute(checked.prompt, "p2", interrupt_after_step_one, outputs=checked.outputs)
    assert outcome.status == "interrupted" and calls["n"] == 1
    loras = sorted(engine.env.folders.list("loras"))
    assert "cut-000001.safetensors" in loras and "cut.safetensors" not in loras


def test_bad_node_input_is_an_error_naming_it(tmp_path: Path, mini_checkpoint: Path) -> None:
    engine = build_engine(Settings(base_directory=_base(tmp_path, mini_checkpoint)), all_nodes())
    checked = validate_prompt(_prompt(output_name="../escape"), engine.registry, engine.env)
    outcome = engine.executor.execute(checked.prompt, "p3", lambda e: None, outputs=checked.outputs)
    assert outcome.status == "error" and "output_name" in str(outcome.error)
    assert extra_flags("--noise_offset 0.05 --flip_aug") == {"noise_offset": "0.05", "flip_aug": True}
