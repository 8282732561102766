"""Model folders: listings refresh when files change, names never leave their folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nodegraph import folders as folders_module
from nodegraph.folders import Folders, ModelNotFoundError, PathEscapeError


def test_listing_refreshes_when_a_file_is_added(tmp_path: Path) -> None:
    folders = Folders.at(tmp_path)
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "a.safetensors").write_bytes(b"x")
    assert folders.list("loras") == ["a.safetensors"]
    (loras / "sub").mkdir()
    (loras / "sub" / "b.safetensors").write_bytes(b"x")
    (loras / "notes.txt").write_text("not a model")
    assert folders.list("loras") == ["a.safetensors", "sub/b.safetensors"]


def test_a_file_added_during_a_scan_appears_in_the_next_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = Folders.at(tmp_path)
    ckpts = tmp_path / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "a.safetensors").write_bytes(b"x")
    walk = folders_module._walk_files

    def walk_then_add(dirs: list[Path], extensions: frozenset[str]) -> list[str]:
        found = list(walk(dirs, extensions))
        late = ckpts / "late.safetensors"
        late.write_bytes(b"x")
        stamp = time.time() + 5  # make the directory's mtime visibly newer than at the scan's start
        os.utime(ckpts, (stamp, stamp))
        return found

    monkeypatch.setattr(folders_module, "_walk_files", walk_then_add)
    assert folders.list("checkpoints") == ["a.safetensors"]
    monkeypatch.setattr(folders_module, "_walk_files", walk)
    assert folders.list("checkpoints") == ["a.safetensors", "late.safetensors"]


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/../../x", "a\x00b", "..\\x", ""])
def test_model_names_cannot_leave_their_folder(tmp_path: Path, name: str) -> None:
    folders = Folders.at(tmp_path)
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "x.safetensors").write_bytes(b"x")
    with pytest.raises(PathEscapeError):
        folders.resolve("checkpoints", name)


def test_a_missing_model_names_its_folder(tmp_path: Path) -> None:
    folders = Folders.at(tmp_path)
    with pytest.raises(ModelNotFoundError, match="checkpoints file 'nope.safetensors' not found"):
        folders.resolve("checkpoints", "nope.safetensors")


def test_extra_model_paths_a111_section(tmp_path: Path) -> None:
    a1111 = tmp_path / "webui"
    (a1111 / "models" / "Lora").mkdir(parents=True)
    (a1111 / "models" / "Lora" / "style.safetensors").write_bytes(b"x")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(
        "a111:\n  base_path: webui\n  checkpoints: models/Stable-diffusion\n"
        "  loras: |\n    models/Lora\n    models/LyCORIS\n"
    )
    folders = Folders.at(tmp_path / "base")
    folders.load_extra_model_paths(config)
    assert folders.list("loras") == ["style.safetensors"]
    assert folders.resolve("loras", "style.safetensors") == a1111 / "models" / "Lora" / "style.safetensors"
