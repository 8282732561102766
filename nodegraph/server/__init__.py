"""nodegraph's HTTP and websocket server: ComfyUI's API (comfyui.md §4), on aiohttp, torch-free.

`create_app(engine)` builds the application; `serve(engine)` runs it on the engine's settings
(`listen`, `port`), printing the access token when one is needed.

Where things are:
    app.py           the application: middlewares, every route under `/` and `/api`, start/stop
    routes_prompt.py /prompt (+ ?wait=true, /prompt/{id}/cancel), /queue, /history, /interrupt, /free
    routes_files.py  /view, /upload/image, /upload/mask
    routes_info.py   /object_info, /models, /embeddings, /system_stats, /features, /extensions ...
    routes_user.py   /settings, /userdata, /v2/userdata, /users
    routes_jobs.py   /api/jobs (list, detail, cancel) over jobs.py's records; /global_subgraphs,
                     /node_replacements, /models/download (refused: offline)
    a1111.py         A1111 requests -> ComfyUI graphs (names, hires, LoRA tags), infotext
    routes_a1111.py  /sdapi/v1 options, models, loras, samplers, progress, interrupt, png-info
    routes_images.py /sdapi/v1/txt2img, /sdapi/v1/img2img, OpenAI /v1/images/generations
    api_auth.py      --api-auth: HTTP Basic on the A1111/OpenAI routes
    queue.py         the SQLite queue and history (survive a restart)
    worker.py        the executor thread: one prompt at a time, history, /free
    ray_pool.py      `serve --workers N`: Ray actors (ray_actor.py) drain the queue; routing.py picks one
    messages.py      execution events -> ComfyUI websocket messages and binary previews
    ws.py            /ws: clients, per-client outboxes, the thread -> event loop bridge
    auth.py          access token, Origin and Host checks, CORS option
    frontend.py      the canvas (owned by the canvas code): `/`, static files, extension URLs
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

from aiohttp import web

from nodegraph.server.app import WorkerFactory, create_app
from nodegraph.server.state import STATE

if TYPE_CHECKING:
    from nodegraph.engine import Engine

__all__ = ["create_app", "serve"]
log = logging.getLogger(__name__)


def serve(engine: Engine, workers: WorkerFactory | None = None) -> None:
    """Run the server until interrupted (Ctrl-C); pending prompts stay queued for the next start.

    Args:
        engine: the built engine; its settings give `listen` (comma-separated hosts) and `port`.
        workers: what runs the prompts instead of one in-process worker (Ray workers).
    """
    listen = engine.settings.listen or "127.0.0.1"
    port = engine.settings.port  # 0 asks the OS for a free port
    app = create_app(engine, workers=workers)
    hosts = [h.strip() for h in listen.split(",") if h.strip()]
    token = app[STATE].token
    shown = hosts[0] if hosts[0] not in ("0.0.0.0", "::") else "127.0.0.1"

    def announce(_aiohttp_message: str) -> None:
        """Called by aiohttp once the sockets listen (after the warm-up): scripts may wait for it."""
        print(f"nodegraph serving on http://{shown}:{port}/ (listening on {', '.join(hosts)})", flush=True)
        if token is not None:
            print(f"access token: {token}", flush=True)
            print(
                f"open http://{shown}:{port}/?token={token} once in the browser; scripts send "
                f"'Authorization: Bearer {token}'",
                flush=True,
            )

    web.run_app(app, host=hosts, port=port, print=announce, access_log=None)
    _exit_if_a_worker_is_stuck()


def _exit_if_a_worker_is_stuck() -> None:
    """End the process now if a worker thread is still inside a node after the shutdown's wait.

    A daemon thread still in torch when the interpreter finalises aborts the process ("terminate
    called without an active exception", exit -6). The queue is already closed: the prompt that
    was running is still marked running there and is queued again at the next start.
    """
    stuck = [t.name for t in threading.enumerate() if t.name.startswith("nodegraph-") and t.is_alive()]
    if stuck:
        log.warning("%s still inside a node after the stop; exiting without waiting for it", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
