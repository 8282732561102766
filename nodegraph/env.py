"""The environment a node runs in: folders, flags and long-lived services (such as the model store).

The engine keeps services by type without knowing what they are, so `nodegraph/` stays torch-free
while `nodes/` keeps its model store here. `main` builds the environment, visibly, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from nodegraph.folders import Folders

T = TypeVar("T")


@runtime_checkable
class Freeable(Protocol):
    """A service that holds memory it can give back (ComfyUI's `POST /free`)."""

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """Unload models (`unload_models`) and/or return cached memory to the system (`free_memory`)."""


@dataclass
class Environment:
    """Folders, user-visible flags and shared services for one engine instance."""

    folders: Folders
    disable_metadata: bool = False
    preview_method: str = "none"
    device: str = "auto"
    precision: str = "auto"
    services: dict[type, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def service(self, kind: type[T], factory: Callable[[Environment], T] | None = None) -> T:
        """The one instance of `kind`, made by `factory` on first use.

        Args:
            kind: the service's class, used as its key.
            factory: builds it when absent; without one a missing service is an error.
        """
        with self._lock:
            found = self.services.get(kind)
            if found is None:
                if factory is None:
                    raise LookupError(f"no {kind.__name__} service in this environment")
                found = factory(self)
                self.services[kind] = found
            return found

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """Ask every `Freeable` service to let go (the model store, its LoRA caches, ...)."""
        with self._lock:
            services = list(self.services.values())
        for service in services:
            if isinstance(service, Freeable):
                service.free(unload_models, free_memory)
