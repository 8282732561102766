"""The example workflows in workflows/ run headless on the demo models, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodegraph.cli import main
from nodegraph.folders import Folders
from nodes.demo import write_demo_models

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("demo")
    write_demo_models(Folders.at(base))
    return base


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_every_example_workflow_is_covered() -> None:
    assert sorted(p.name for p in WORKFLOWS.glob("*.json")) == [
        "img2img.json",
        "txt2img.json",
        "txt2img_two_loras.json",
    ]


def test_txt2img_and_chained_loras_run_and_the_loras_change_the_image(demo_base: Path) -> None:
    small = ["--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=2"]
    files = [str(WORKFLOWS / "txt2img.json"), str(WORKFLOWS / "txt2img_two_loras.json")]
    assert main(["run", *files, *small, "--base-directory", str(demo_base), "--preview-method", "none"]) == 0
    plain = _pixels(demo_base / "output" / "txt2img_00001_.png")
    with_loras = _pixels(demo_base / "output" / "txt2img_two_loras_00001_.png")
    assert plain.shape == with_loras.shape == (64, 64, 3)
    assert plain.std() > 1  # an image, not a constant
    assert np.abs(plain - with_loras).mean() > 1  # the two chained LoRAs did something


def test_img2img_runs_on_the_demo_input_image(demo_base: Path) -> None:
    args = ["run", str(WORKFLOWS / "img2img.json"), "--set", "3.steps=2", "--base-directory", str(demo_base)]
    assert main([*args, "--preview-method", "none"]) == 0
    source = Image.open(demo_base / "input" / "nodegraph_demo.png")
    result = Image.open(demo_base / "output" / "img2img_00001_.png")
    assert result.size == (source.width // 8 * 8, source.height // 8 * 8)
    assert _pixels(demo_base / "output" / "img2img_00001_.png").std() > 1
