"""The model store: one loaded copy of each checkpoint, shared by every loader node and workflow.

A service of the environment (`env.service(ModelStore, ModelStore.create)`). Entries are keyed by
the resolved path and the file's (mtime_ns, size), so a replaced file is loaded afresh; at most
`capacity` checkpoints stay loaded (least recently used goes first). Loading happens outside the
store's lock, under a per-key lock, so two workflows asking for the same file load it once and
a slow load never blocks other lookups.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodes.sd.checkpoint import LoadedCheckpoint, load_checkpoint

StoreKey = tuple[str, int, int]


def file_stamp(path: Path) -> tuple[int, int]:
    """(st_mtime_ns, st_size) of a file, or of a folder's newest entry (a diffusers folder)."""
    stat = path.stat()
    if not path.is_dir():
        return stat.st_mtime_ns, stat.st_size
    newest, total = stat.st_mtime_ns, 0
    for root, _, files in os.walk(path):
        for name in files:
            s = os.stat(os.path.join(root, name))
            newest, total = max(newest, s.st_mtime_ns), total + s.st_size
    return newest, total


class ModelStore:
    """Loaded checkpoints by (path, mtime_ns, size), bounded, thread-safe."""

    def __init__(
        self, capacity: int = 2, loader: Callable[[Path], LoadedCheckpoint] = load_checkpoint
    ) -> None:
        self.capacity = max(1, capacity)
        self._loader = loader
        self._entries: OrderedDict[StoreKey, LoadedCheckpoint] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[StoreKey, threading.Lock] = {}
        self.loads = 0  # how many times a file was actually read (for tests and logs)

    @classmethod
    def create(cls, env: Any) -> ModelStore:
        """Factory for `env.service`."""
        return cls()

    def checkpoint(self, path: Path) -> LoadedCheckpoint:
        """The loaded checkpoint at `path`, loading it (once) if it is new or changed on disk."""
        resolved = Path(os.path.realpath(path))
        key: StoreKey = (str(resolved), *file_stamp(resolved))
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        try:
            with key_lock:
                with self._lock:
                    found = self._entries.get(key)
                    if found is not None:
                        return found
                loaded = self._loader(resolved)
                with self._lock:
                    self.loads += 1
                    self._forget_older_versions(key)
                    self._entries[key] = loaded
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)
                return loaded
        finally:
            # Also when the loader raises: a failed load leaves no lock behind. Only our own lock
            # is dropped; a waiter that arrived after an earlier pop may have made a fresh one.
            with self._lock:
                if self._key_locks.get(key) is key_lock:
                    del self._key_locks[key]

    def _forget_older_versions(self, key: StoreKey) -> None:
        for other in [k for k in self._entries if k[0] == key[0] and k != key]:
            del self._entries[other]

    def loaded(self) -> list[str]:
        """Paths currently held, oldest first."""
        with self._lock:
            return [k[0] for k in self._entries]

    def clear(self) -> None:
        """Drop every loaded checkpoint (frees memory once no handle refers to them)."""
        with self._lock:
            self._entries.clear()
