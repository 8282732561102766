"""The environment a node runs in: folders, flags and long-lived services (such as the model store).

The engine keeps services by type without knowing what they are, so `nodegraph/` stays torch-free
while `nodes/` keeps its model store here. `main` builds the environment, visibly, once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nodegraph.folders import Folders

T = TypeVar("T")


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
