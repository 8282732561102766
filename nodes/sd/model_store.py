"""The model store: one loaded copy of each model file, shared by every loader node and workflow.

A service of the environment (`env.service(ModelStore, ModelStore.create)`). Entries are keyed by
what was loaded (a checkpoint, a UNet-only file with its weight dtype, text encoder files with their
type, a VAE file) and the resolved path and (mtime_ns, size) of each file read, so a replaced file is
loaded afresh; at most `capacity` entries stay loaded (least recently used goes first; a handle that
still points at an evicted entry keeps it alive until it is dropped). Loading happens outside the
store's lock, under a per-key lock, so two workflows asking for the same file load it once and a
slow load never blocks other lookups.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from nodegraph.primitives import LruCache, file_stamp
from nodes.sd.checkpoint import LoadedCheckpoint, load_checkpoint
from nodes.sd.lora.loader import clear_caches as clear_lora_caches

__all__ = ["ModelStore", "StoreKey", "file_stamp"]

FileKey = tuple[str, int, int]  # (resolved path, mtime_ns, size)
StoreKey = tuple[str, tuple[FileKey, ...]]  # (what was loaded, e.g. "checkpoint" or "unet:default"; files)
T = TypeVar("T")
CHECKPOINT = "checkpoint"


class ModelStore:
    """Loaded models by (kind, files with their stamps), bounded, thread-safe."""

    def __init__(
        self, capacity: int = 2, loader: Callable[[Path], LoadedCheckpoint] = load_checkpoint
    ) -> None:
        self.capacity = max(1, capacity)
        self._loader = loader
        self._entries: LruCache[StoreKey, Any] = LruCache(max_entries=self.capacity)
        self._lock = threading.Lock()
        self._key_locks: dict[StoreKey, threading.Lock] = {}
        self.loads = 0  # how many times a file was actually read (for tests and logs)

    @classmethod
    def create(cls, env: Any) -> ModelStore:
        """Factory for `env.service`."""
        return cls()

    def checkpoint(self, path: Path) -> LoadedCheckpoint:
        """The loaded checkpoint at `path`, loading it (once) if it is new or changed on disk.

        Two names for one file (a symlink and its target) share one load, keyed by the real path,
        but the file is read under the name the workflow gave: a symlink into a cache of blobs
        (`blob_ab12`, no extension) keeps its own name and extension in format checks and messages.
        """
        loaded: LoadedCheckpoint = self.load(CHECKPOINT, (path,), lambda: self._loader(path))
        return loaded

    def load(self, kind: str, paths: Sequence[Path], loader: Callable[[], T]) -> T:
        """What `loader()` makes of the files at `paths`, loaded once per `kind` and file versions.

        `kind` names what is made of the files and how (`"unet:fp8_e4m3fn"`, `"clip:sdxl"`): the same
        file loaded two ways is two entries; a changed file replaces its older versions' entries.
        """
        files = tuple((os.path.realpath(p), *file_stamp(Path(os.path.realpath(p)))) for p in paths)
        key: StoreKey = (kind, files)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                return cast(T, found)
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        try:
            with key_lock:
                with self._lock:
                    found = self._entries.get(key)
                    if found is not None:
                        return cast(T, found)
                loaded = loader()
                with self._lock:
                    self.loads += 1
                    self._forget_older_versions(key)
                    self._entries.put(key, loaded)
                return loaded
        finally:
            # Also when the loader raises: a failed load leaves no lock behind. Only our own lock
            # is dropped; a waiter that arrived after an earlier pop may have made a fresh one.
            with self._lock:
                if self._key_locks.get(key) is key_lock:
                    del self._key_locks[key]

    def _forget_older_versions(self, key: StoreKey) -> None:
        """Drop every entry made from an older version of one of these files, whatever its kind."""
        current = {path: (mtime, size) for path, mtime, size in key[1]}

        def older(entry: StoreKey) -> bool:
            return any(path in current and current[path] != (mtime, size) for path, mtime, size in entry[1])

        self._entries.discard(k for k in self._entries.keys() if older(k))

    def loaded(self) -> list[str]:
        """Paths currently held (the first file of each entry), oldest first."""
        return [k[1][0][0] for k in self._entries.keys()]

    def kinds(self) -> list[str]:
        """What each held entry is (`"checkpoint"`, `"unet:default"` ...), oldest first."""
        return [k[0] for k in self._entries.keys()]

    def clear(self) -> None:
        """Drop every loaded checkpoint (frees memory once no handle refers to them)."""
        with self._lock:
            self._entries.clear()

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """`/free` for the node layer (an `env.free` service): unload the checkpoints and the read and
        decoded LoRAs, then hand the memory back to the system."""
        if unload_models:
            self.clear()
            clear_lora_caches()
        if unload_models or free_memory:
            release_memory()


def release_memory() -> None:
    """Collect what was dropped and give it back: the CUDA cache, and glibc's freed heap pages
    (without `malloc_trim` a process's RSS stays at its peak after large tensors are freed)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass
