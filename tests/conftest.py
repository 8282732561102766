"""Fixtures shared by every test directory: the oracle's generated model files, cached between runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
