"""Fixtures shared by every test directory: the oracle's generated model files, cached between runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ORACLE = SHARED / "oracle"
CACHE = ROOT / "tests" / ".cache"


def _generate(script: str, out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(ORACLE / script), str(out), *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    if not ORACLE.is_dir():
        pytest.fail(f"the oracle is missing: expected {ORACLE} beside the project")
    return ORACLE


@pytest.fixture(scope="session")
def mini_checkpoint(oracle_dir: Path) -> Path:
    """The oracle's random SD1.5-shaped checkpoint (original LDM single file, fp16), made by its script."""
    path = CACHE / "mini_sd15.safetensors"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")  # an interrupted run must not leave a truncated cache
        _generate("make_mini_sd15.py", partial)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_loras(oracle_dir: Path) -> Path:
    """A folder with the oracle's kohya LoRAs mini_lora_a/b.safetensors."""
    folder = CACHE / "loras"
    if not (folder / "mini_lora_b.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        _generate("make_mini_lora.py", folder)
    return folder


@pytest.fixture(scope="session")
def mini_sdxl_checkpoint(oracle_dir: Path) -> Path:
    """The oracle's random SDXL-family checkpoint (SGM single file, fp16, 2.3 GB), made by its script."""
    path = CACHE / "mini_sdxl.safetensors"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        _generate("make_mini_sdxl.py", partial)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_sdxl_loras(oracle_dir: Path) -> Path:
    """A folder with the oracle's kohya SDXL LoRA mini_sdxl_lora.safetensors."""
    folder = CACHE / "sdxl_loras"
    if not (folder / "mini_sdxl_lora.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "partial"
        partial.mkdir(exist_ok=True)
        _generate("make_mini_sdxl_lora.py", partial)
        (partial / "mini_sdxl_lora.safetensors").rename(folder / "mini_sdxl_lora.safetensors")
    return folder


@pytest.fixture(scope="session")
def sdxl_store(mini_sdxl_checkpoint: Path) -> Any:
    """One model store for the whole session with the mini SDXL checkpoint loaded once (about 4.6 GB
    as fp32 modules). Engines that run SDXL share it: `engine.env.services[ModelStore] = sdxl_store`."""
    from nodes.sd.model_store import ModelStore

    store = ModelStore(capacity=3)
    store.checkpoint(mini_sdxl_checkpoint)
    return store


def _cached(name: str, script: str, *args: str) -> Path:
    """A generated oracle model file in the shared cache, made atomically when missing."""
    path = CACHE / name
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        _generate(script, partial, *args)
        partial.rename(path)
    return path


@pytest.fixture(scope="session")
def mini_checkpoint_seed1(oracle_dir: Path) -> Path:
    """The oracle's second mini SD1.5 checkpoint (`--seed 1`), model2 of its merge workflows."""
    return _cached("mini_sd15_seed1.safetensors", "make_mini_sd15.py", "--seed", "1")


@pytest.fixture(scope="session")
def mini_controlnet(oracle_dir: Path) -> Path:
    """The oracle's SD1.5 ControlNet shaped for the mini UNet (original `control_*` layout)."""
    return _cached("mini_controlnet.safetensors", "make_mini_controlnet.py")
