"""nodegraph/ imports without torch (and without the SD node packages): the engine knows nothing of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, pkgutil, sys
for blocked in ("torch", "diffusers", "transformers", "nodes"):
    sys.modules[blocked] = None  # any import of these now raises ImportError
import nodegraph
names = [m.name for m in pkgutil.walk_packages(nodegraph.__path__, "nodegraph.")]
names = [n for n in names if n != "nodegraph.__main__"]  # running it would parse this script's argv
for name in names:
    importlib.import_module(name)
from nodegraph.cli import build_parser
build_parser()
print(len(names))
"""


def test_every_nodegraph_module_imports_without_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 10  # the walk found the engine's modules


def test_python_m_nodegraph_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nodegraph", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "validate" in done.stdout and "run" in done.stdout
