"""ARCHITECTURE.md maps every module: each file under `nodegraph/` and `nodes/` is named there, and
every file it names exists.

A module is named by its path in backticks (`nodes/sd/vae.py`), or by its file name alone
(`vae_tiled.py`) after a path of the same folder on the same line: in a map row
"`nodegraph/node.py`, `inputs.py`" both are named. A bare name belongs to the folder of the latest
full path before it, so a file of another folder is written out in full. Package `__init__.py`
files count as named.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAP = ROOT / "ARCHITECTURE.md"
PACKAGES = ("nodegraph", "nodes")
_PATH = re.compile(r"^(?:nodegraph|nodes)/[\w/]*(?:\.py|/)$")
_NAME = re.compile(r"^\w+\.py$")


def named_paths(text: str) -> set[str]:
    """Every module path ARCHITECTURE.md names (folders keep their trailing `/`)."""
    named: set[str] = set()
    for line in text.splitlines():
        folder = None  # the folder of the line's latest full path
        for quoted in re.findall(r"`([^`]+)`", line):
            for word in re.split(r"[\s,+()]+", quoted):
                if _PATH.match(word):
                    named.add(word)
                    folder = word.rstrip("/") if word.endswith("/") else word.rsplit("/", 1)[0]
                elif _NAME.match(word) and folder:
                    named.add(f"{folder}/{word}")
    return named


def modules() -> list[str]:
    found = (p.relative_to(ROOT).as_posix() for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    return sorted(path for path in found if not path.endswith("/__init__.py"))


def test_every_module_is_on_the_map() -> None:
    named = named_paths(MAP.read_text(encoding="utf-8"))
    assert [path for path in modules() if path not in named] == []


def test_every_module_the_map_names_exists() -> None:
    named = named_paths(MAP.read_text(encoding="utf-8"))
    assert sorted(path for path in named if not (ROOT / path).exists()) == []


def test_a_bare_file_name_belongs_to_the_folder_of_the_path_before_it() -> None:
    line = "| `nodegraph/node.py`, `inputs.py` | ... `nodes/sd/vae.py` and `vae_tiled.py`, `/api` `x.py` |"
    assert named_paths(line) == {
        "nodegraph/node.py",
        "nodegraph/inputs.py",
        "nodes/sd/vae.py",
        "nodes/sd/vae_tiled.py",
        "nodes/sd/x.py",
    }
