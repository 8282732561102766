"""The model store: one loaded copy of each checkpoint, shared by every loader node and workflow.

A service of the environment (`env.service(ModelStore, ModelStore.create)`). Entries are keyed by
the resolved path and the file's (mtime_ns, size), so a replaced file is loaded afresh; at most
`capacity` checkpoints stay loaded (least recently used goes first). Loading happens outside the
store's lock, under a per-key lock, so two workflows asking for the same file load it once and
a slow load never blocks other lookups.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nodegraph.primitives import LruCache, file_stamp
from nodes.sd.checkpoint import LoadedCheckpoint, load_checkpoint
from nodes.sd.lora.loader import clear_caches as clear_lora_caches

__all__ = ["ModelStore", "StoreKey", "file_stamp"]

StoreKey = tuple[str, int, int]


class ModelStore:
    """Loaded checkpoints by (path, mtime_ns, size), bounded, thread-safe."""

    def __init__(
        self, capacity: int = 2, loader: Callable[[Path], LoadedCheckpoint] = load_checkpoint
    ) -> None:
        self.capacity = max(1, capacity)
        self._loader = loader
        self._entries: LruCache[StoreKey, LoadedCheckpoint] = LruCache(max_entries=self.capacity)
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
        resolved = Path(os.path.realpath(path))
        key: StoreKey = (str(resolved), *file_stamp(resolved))
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                return found
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        try:
            with key_lock:
                with self._lock:
                    found = self._entries.get(key)
                    if found is not None:
                        return found
                loaded = self._loader(path)
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
        self._entries.discard(k for k in self._entries.keys() if k[0] == key[0] and k != key)

    def loaded(self) -> list[str]:
        """Paths currently held, oldest first."""
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
