"""kohya dataset folders under the input directory, for the TrainLora node's choices and the canvas.

A dataset is a folder holding `N_name` subfolders (`input/lisa/img/6_lisabp woman/`). Listing reads
names and counts files only (no image is decoded: a training run checks every image itself before
loading the checkpoint), so it is torch-free and cheap enough for `/object_info` and the panel.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NONE = "none"  # the choice shown when the input folder holds no dataset
_NUMBERED = re.compile(r"^\d+_")


def dataset_folders(root: Path) -> list[str]:
    """Folders under `root` (3 levels deep at most) that hold `N_name` subfolders: kohya datasets."""
    found: list[str] = []
    for current, dirs, _files in os.walk(root) if root.is_dir() else ():
        depth = len(Path(current).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < 3 else []
        if depth and any(_NUMBERED.match(d) for d in dirs):
            found.append(Path(current).relative_to(root).as_posix())
    return found


_SUBFOLDER = re.compile(r"^(\d+)_(.*)$")


def describe_dataset(root: Path, name: str) -> dict[str, Any]:
    """One candidate folder: its `N_name` subfolders with counts, and what kohya would make of it."""
    subsets: list[dict[str, Any]] = []
    problems: list[str] = []
    for sub in sorted(p for p in (root / name).iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _SUBFOLDER.match(sub.name)
        if match is None:
            continue  # kohya skips a folder without a repeat prefix (sample_images/, ...)
        files = [p for p in sub.iterdir() if p.is_file()]
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        captions = sum(1 for p in images if p.with_suffix(".txt").is_file())
        repeats = int(match.group(1))
        if repeats < 1:
            problems.append(f"'{sub.name}': the repeat count must be at least 1 (kohya skips it)")
        if not images:
            problems.append(f"'{sub.name}' holds no images")
        subsets.append(
            {
                "folder": sub.name,
                "repeats": repeats,
                "class_tokens": match.group(2),
                "images": len(images),
                "captions": captions,
            }
        )
    return {
        "name": name,
        "subsets": subsets,
        "images": sum(s["images"] for s in subsets),
        "images_per_epoch": sum(s["images"] * s["repeats"] for s in subsets if s["repeats"] >= 1),
        "problems": problems,
    }


def list_datasets(root: Path) -> dict[str, Any]:
    """Every dataset under the input folder `root`, described (`GET /nodegraph/train/datasets`)."""
    names = dataset_folders(root)
    return {"input_dir": str(root), "datasets": [describe_dataset(root, n) for n in names]}
