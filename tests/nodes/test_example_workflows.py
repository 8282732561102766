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
        "sdxl_base_refiner.json",
        "sdxl_two_loras.json",
        "sdxl_txt2img.json",
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


@pytest.fixture(scope="module")
def sdxl_demo_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SDXL demo models only (`nodegraph demo --sdxl` writes them beside the SD1.5 ones)."""
    from nodes import demo_sdxl

    base = tmp_path_factory.mktemp("demo_sdxl")
    folders = Folders.at(base)
    ckpts = folders.paths("checkpoints")[0]
    demo_sdxl.write_sdxl_checkpoint(ckpts / demo_sdxl.SDXL_DEMO_NAME)
    refiner = demo_sdxl.REFINER_MINI
    demo_sdxl.write_sdxl_checkpoint(ckpts / demo_sdxl.REFINER_DEMO_NAME, refiner, "nodegraph-demo-refiner")
    loras = folders.paths("loras")[0]
    demo_sdxl.write_sdxl_lora(loras / demo_sdxl.SDXL_LORA_NAMES[0], "a", 4, 4.0)
    demo_sdxl.write_sdxl_lora(loras / demo_sdxl.SDXL_LORA_NAMES[1], "b", 8, 4.0)
    return base


def test_sdxl_txt2img_and_base_refiner_run_on_the_sdxl_demo_models(sdxl_demo_base: Path) -> None:
    small = ["--set", "5.width=64", "--set", "5.height=64"]
    txt = [str(WORKFLOWS / "sdxl_txt2img.json"), *small, "--set", "3.steps=2"]
    refined = [
        str(WORKFLOWS / "sdxl_base_refiner.json"),
        *small,
        "--set",
        "10.steps=3",
        "--set",
        "11.steps=3",
    ]
    refined += ["--set", "10.end_at_step=2", "--set", "11.start_at_step=2"]
    common = ["--base-directory", str(sdxl_demo_base), "--preview-method", "none"]
    assert main(["run", *txt, *common]) == 0
    assert main(["run", *refined, *common]) == 0
    plain = _pixels(sdxl_demo_base / "output" / "sdxl_txt2img_00001_.png")
    handed_off = _pixels(sdxl_demo_base / "output" / "sdxl_base_refiner_00001_.png")
    assert plain.shape == handed_off.shape == (64, 64, 3)
    assert plain.std() > 1 and handed_off.std() > 1


def test_sdxl_two_chained_loras_change_the_sdxl_image(sdxl_demo_base: Path) -> None:
    small = ["--set", "5.width=64", "--set", "5.height=64", "--set", "3.steps=2"]
    common = ["--base-directory", str(sdxl_demo_base), "--preview-method", "none"]
    files = [str(WORKFLOWS / "sdxl_txt2img.json"), str(WORKFLOWS / "sdxl_two_loras.json")]
    assert main(["run", *files, *small, *common]) == 0
    plain = _pixels(sorted((sdxl_demo_base / "output").glob("sdxl_txt2img_*.png"))[-1])
    with_loras = _pixels(sdxl_demo_base / "output" / "sdxl_two_loras_00001_.png")
    assert plain.shape == with_loras.shape == (64, 64, 3)
    assert np.abs(plain - with_loras).mean() > 1  # both LoRAs (UNet and both encoders) moved the image
