"""The LoRA file cache: read once per (path, stamp), bounded, re-read when the file changes; clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nodegraph.primitives import LruCache
from nodes.sd.lora import loader
from nodes.sd.lora.loader import LoraFileError, clear_caches, file_stamp, read_lora


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = loader._load_tensors

    def counting(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(loader, "_load_tensors", counting)
    clear_caches()
    return reads


def test_a_file_is_read_once_until_it_changes(counted: list[Path], mini_loras: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    shutil.copy(mini_loras / "mini_lora_a.safetensors", path)
    first = read_lora(path, file_stamp(path))
    assert read_lora(path, file_stamp(path)) is first and len(counted) == 1
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path))
    changed = read_lora(path, file_stamp(path))
    assert changed is not first and list(changed.groups) == ["lora_unet_x"] and len(counted) == 2


def test_the_cache_is_bounded_by_bytes() -> None:
    cache: LruCache[str, bytes] = LruCache(max_bytes=10, size=len)
    for key in "abc":
        cache.get_or_make(key, lambda: b"xxxx")
    assert len(cache) == 2  # 12 bytes > 10: the oldest went
    made = []
    cache.get_or_make("a", lambda: made.append(1) or b"xxxx")
    assert made == [1]


def test_unreadable_file_names_itself(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraFileError, match="broken.safetensors"):
        read_lora(bad)
    empty = tmp_path / "empty.pt"
    torch.save({"note": "no tensors"}, empty)
    with pytest.raises(LoraFileError, match="empty.pt holds no tensors"):
        read_lora(empty)


def test_unknown_keys_are_kept_for_the_report(tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(1, 1), "something_else": torch.zeros(1)}, str(path)
    )
    parsed = read_lora(path)
    assert parsed.unknown_keys == ["something_else"] and set(parsed.groups) == {"lora_unet_a"}
