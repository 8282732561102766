"""What every route handler shares: the engine, the queue store, the websocket hub and the worker."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodegraph.server.queue import PromptStore
from nodegraph.server.worker import PromptWorker
from nodegraph.server.ws import Hub

if TYPE_CHECKING:
    from nodegraph.engine import Engine

MAX_UPLOAD_SIZE = 100 * 1024 * 1024
MAX_JSON_SIZE = 32 * 1024 * 1024
# A canvas workflow nests about 10 levels; deeper JSON is refused before anything recurses on it.
MAX_JSON_DEPTH = 100


def server_features(max_upload_size: int) -> dict[str, Any]:
    """`/features` and the websocket `feature_flags` reply: ComfyUI's core flags
    (comfy_api/feature_flags.py) as far as nodegraph honours them. No ComfyUI-Manager, no
    `/api/assets` database and no model-type tags in `/object_info`, so those say False."""
    return {
        "supports_preview_metadata": True,
        "supports_model_type_tags": False,
        "max_upload_size": max_upload_size,
        "extension": {"manager": {"supports_v4": False}},
        "node_replacements": True,
        "assets": False,
    }


@dataclass
class Waiters:
    """The run-and-wait requests by prompt id, woken when their prompt ends.

    Built before the worker, the hub and the state: handlers add futures, the worker wakes them from
    its thread. Nothing in it points back at the `ServerState`, so the state is in no reference
    cycle and is freed with its app."""

    pending: dict[str, list[asyncio.Future[dict[str, Any]]]] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None  # set when the app starts

    def resolve(self, prompt_id: str, result: dict[str, Any]) -> None:
        """Wake every run-and-wait request for `prompt_id` (call on the event loop)."""
        for future in self.pending.pop(prompt_id, []):
            if not future.done():
                future.set_result(result)

    def resolve_from_thread(self, prompt_id: str, result: dict[str, Any]) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.resolve, prompt_id, result)
            except RuntimeError:  # loop closed while shutting down: nobody is waiting any more
                pass

    def cancel_all(self) -> None:
        for futures in self.pending.values():
            for future in futures:
                future.cancel()


@dataclass
class ServerState:
    """The server's parts, built by `create_app` and reached by handlers through `state(request)`."""

    engine: Engine
    store: PromptStore
    hub: Hub
    worker: PromptWorker
    token: str | None
    max_upload_size: int = MAX_UPLOAD_SIZE
    wake: Waiters = field(default_factory=Waiters)
    # Prompt validation runs here, not on the default pool that every other route's file and
    # database work uses: heavy prompts then queue behind each other instead of starving /queue.
    validator: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="nodegraph-validate")
    )
    max_queue: int | None = None
    switch_interval: float | None = None  # the GIL switch interval before the server set its own

    @property
    def waiters(self) -> dict[str, list[asyncio.Future[dict[str, Any]]]]:
        """Run-and-wait futures by prompt id (`Waiters.pending`)."""
        return self.wake.pending

    def resolve_waiters(self, prompt_id: str, result: dict[str, Any]) -> None:
        """Wake every run-and-wait request for `prompt_id` (call on the event loop)."""
        self.wake.resolve(prompt_id, result)

    def features(self) -> dict[str, Any]:
        return server_features(self.max_upload_size)


STATE: web.AppKey[ServerState] = web.AppKey("nodegraph_state", ServerState)


def state(request: web.Request) -> ServerState:
    return request.app[STATE]
