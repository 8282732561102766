"""The torch-free primitives: one LRU (output cache, model store, LoRA caches) and one file stamp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodegraph.primitives import LruCache, file_stamp


def test_bounded_by_entries_oldest_first() -> None:
    cache: LruCache[str, int] = LruCache(max_entries=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now the newest
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"]


def test_bounded_by_bytes_and_pins_survive() -> None:
    cache: LruCache[str, bytes] = LruCache(max_bytes=10, size=len)
    cache.put("a", b"xxxx")
    cache.pin(["a"])
    cache.put("b", b"xxxx")
    cache.put("c", b"xxxx")
    assert "a" in cache and "b" not in cache and cache.nbytes == 8
    cache.unpin()
    cache.put("d", b"xxxxxxxxxxxx")  # larger than the bound on its own: kept while newest
    assert cache.keys() == ["d"] and cache.nbytes == 12


def test_get_or_make_makes_once() -> None:
    cache: LruCache[str, list[int]] = LruCache(max_entries=4)
    made: list[int] = []
    first = cache.get_or_make("k", lambda: made.append(1) or [1])
    assert cache.get_or_make("k", lambda: made.append(2) or [2]) is first and made == [1]
    assert cache.pop("k") is first and len(cache) == 0 and cache.pop("k") is None


def test_a_byte_bound_needs_a_size() -> None:
    with pytest.raises(ValueError, match="size function"):
        LruCache(max_bytes=10)


def test_file_stamp_follows_files_and_folders(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"one")
    before = file_stamp(path)
    path.write_bytes(b"three")
    assert file_stamp(path) != before and file_stamp(path)[1] == 5
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"ab")
    stamp = file_stamp(folder)
    (folder / "unet" / "w.bin").write_bytes(b"abc")
    os.utime(folder / "unet" / "w.bin", ns=(stamp[0] + 10**9, stamp[0] + 10**9))
    assert file_stamp(folder) != stamp and file_stamp(folder)[1] == 3
    with pytest.raises(OSError):
        file_stamp(tmp_path / "missing")
