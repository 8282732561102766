"""Torch-free building blocks shared by the engine and the model code: `LruCache` and `file_stamp`.

This module imports nothing from `nodegraph` (or `nodes`), so `nodes/sd/` may use it: it is the
one module of `nodegraph` the model code is allowed to import (`tests/engine/test_layers.py`).
The output cache, the model store and the LoRA caches are all `LruCache`s; the loaders' file
fingerprints, the model store's keys and the LoRA caches' keys are all `file_stamp`s.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def file_stamp(path: Path) -> tuple[int, int]:
    """(st_mtime_ns, st_size) of a file, or (newest mtime, total size) of a folder's files (a
    diffusers folder): a replaced or edited file gets a new stamp.

    Raises:
        OSError: the path cannot be read.
    """
    stat = path.stat()
    if not path.is_dir():
        return stat.st_mtime_ns, stat.st_size
    newest, total = stat.st_mtime_ns, 0
    for root, _, files in os.walk(path):
        for name in files:
            s = os.stat(os.path.join(root, name))
            newest, total = max(newest, s.st_mtime_ns), total + s.st_size
    return newest, total


class LruCache(Generic[K, V]):
    """A least-recently-used map bounded by entry count and by bytes (`size(value)`), thread-safe.

    Pinned keys are never evicted (the output cache pins the running prompt's entries). An entry
    larger than `max_bytes` on its own is still kept while it is the newest: a bound never makes
    the value just computed unusable.
    """

    def __init__(
        self,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        """Args:
        max_entries: the most entries kept (None: no bound).
        max_bytes: the most bytes kept, as `size` counts them (None: no bound).
        size: a value's bytes; needed with `max_bytes`.
        """
        if max_bytes is not None and size is None:
            raise ValueError("an LruCache bounded by bytes needs a size function")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._size = size
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._pinned: frozenset[K] = frozenset()
        self._bytes = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[K]:
        """The keys, oldest first."""
        with self._lock:
            return list(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: K, value: V) -> None:
        """Store a value, then evict the oldest unpinned entries until the bounds hold."""
        nbytes = self._size(value) if self._size is not None else 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            self._evict(keep=key)

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The cached value, or `make()` stored under `key` (made outside the lock)."""
        found = self.get(key)
        if found is not None:
            return found
        value = make()
        self.put(key, value)
        return value

    def pop(self, key: K) -> V | None:
        with self._lock:
            found = self._entries.pop(key, None)
            if found is None:
                return None
            self._bytes -= found[1]
            return found[0]

    def discard(self, keys: Iterable[K]) -> None:
        for key in list(keys):
            self.pop(key)

    def pin(self, keys: Iterable[K]) -> None:
        """Protect these entries from eviction (replaces the previous pin set)."""
        with self._lock:
            self._pinned = frozenset(keys)

    def unpin(self) -> None:
        with self._lock:
            self._pinned = frozenset()
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _evict(self, keep: K | None = None) -> None:
        extra_entries = len(self._entries) - self.max_entries if self.max_entries is not None else 0
        extra_bytes = self._bytes - self.max_bytes if self.max_bytes is not None else 0
        if extra_entries <= 0 and extra_bytes <= 0:
            return
        victims: list[K] = []
        # Oldest first, stopping as soon as the bounds hold: usually one step per put.
        for key, (_, nbytes) in self._entries.items():
            if extra_entries <= 0 and extra_bytes <= 0:
                break
            if key in self._pinned or key == keep:
                continue
            victims.append(key)
            extra_entries -= 1
            extra_bytes -= nbytes
        for key in victims:
            self._bytes -= self._entries.pop(key)[1]
