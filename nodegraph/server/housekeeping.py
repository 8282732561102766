"""Temp previews do not pile up: the temp folder is emptied at start and stop (as ComfyUI does) and
trimmed to its newest files after each prompt (6,459 preview PNGs were left after 5,000 prompts)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
MAX_TEMP_FILES = 1000


def clear_temp(folder: Path) -> None:
    """Remove everything inside `folder` (never the folder itself, never what a symlink points to)."""
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log.warning("could not remove temp file %s: %s", entry.path, exc)


def trim_temp(folder: Path, keep: int = MAX_TEMP_FILES) -> None:
    """Delete the oldest files at the top of `folder` beyond the newest `keep`."""
    try:
        files = [e for e in os.scandir(folder) if e.is_file(follow_symlinks=False)]
    except OSError:
        return
    if len(files) <= keep:
        return
    files.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime)
    for entry in files[: len(files) - keep]:
        try:
            os.unlink(entry.path)
        except OSError:
            pass
