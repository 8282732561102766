"""A save cut short by a crash leaves `.NAME.safetensors.partial`: no LoRA list shows it, and it is
removed when a run of that name starts again or when the crashed run is reported at the next start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodegraph.engine import Settings, build_engine
from nodegraph.folders import Folders
from nodes import all_nodes
from nodes.train.run import TrainError, TrainHooks, TrainRequest, train_lora
from nodes.train.trainer import TrainOptions
from nodes.train_node import TrainLora

LEFTOVERS = (
    ".mine.safetensors.partial",
    ".mine-000002.safetensors.partial",
    ".mine-step00000010.safetensors.partial",
)
OTHERS = (".mine2.safetensors.partial", ".other.safetensors.partial", "mine.safetensors.partial")


def _loras(root: Path) -> Path:
    loras = root / "models" / "loras"
    loras.mkdir(parents=True)
    for name in (*LEFTOVERS, *OTHERS):
        (loras / name).write_bytes(b"half a file")
    (loras / "kept.safetensors").write_bytes(b"{}")
    return loras


def test_leftovers_are_not_listed_and_a_new_run_of_the_name_removes_them(tmp_path: Path) -> None:
    loras = _loras(tmp_path)
    folders = Folders.at(tmp_path)
    assert folders.list("loras") == ["kept.safetensors"]
    data = tmp_path / "data" / "2_thing"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "a.png")
    notices: list[str] = []
    request = TrainRequest(
        "absent.safetensors", tmp_path / "data", "mine", TrainOptions(resolution=64), steps=1
    )
    with pytest.raises(TrainError, match="absent.safetensors"):  # the run stops at the checkpoint ...
        train_lora(folders, request, hooks=TrainHooks(notice=notices.append))
    left = sorted(p.name for p in loras.iterdir())  # ... after removing this name's leftovers only
    assert left == sorted([*OTHERS, "kept.safetensors"])
    assert notices and "removed 3 unfinished file(s)" in notices[-1]


def test_the_crash_report_at_the_next_start_removes_them(tmp_path: Path) -> None:
    loras = _loras(tmp_path)
    engine = build_engine(Settings(base_directory=tmp_path), all_nodes())
    message = TrainLora.after_crash(engine.env, output_name="mine")
    assert message is not None and "it had saved no LoRA file yet" in message
    assert sorted(p.name for p in loras.iterdir()) == sorted([*OTHERS, "kept.safetensors"])
