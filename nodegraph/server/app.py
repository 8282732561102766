"""Building the aiohttp application: state, middlewares, routes (under `/` and `/api`), lifecycle."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from nodegraph.server import (
    frontend,
    routes_a1111,
    routes_a1111_extra,
    routes_files,
    routes_images,
    routes_info,
    routes_jobs,
    routes_lora,
    routes_prompt,
    routes_train,
    routes_user,
    routes_v2,
    routes_v2_assets,
)
from nodegraph.server.api_auth import parse_credentials, with_api_auth
from nodegraph.server.auth import (
    cors_middleware,
    effective_token,
    host_middleware,
    loopback_host_middleware,
    origin_check,
    token_middleware,
)
from nodegraph.server.housekeeping import clear_temp, trim_temp
from nodegraph.server.queue import PromptStore
from nodegraph.server.replies import BadRequest, error, storage_error, undecodable
from nodegraph.server.state import MAX_UPLOAD_SIZE, STATE, ServerState, Waiters, server_features
from nodegraph.server.v2_assets import ASSETS_FILE, AssetIndex
from nodegraph.server.worker import PromptWorker, Worker, status_message
from nodegraph.server.ws import Hub

if TYPE_CHECKING:
    from nodegraph.engine import Engine

log = logging.getLogger(__name__)
QUEUE_FILE = Path("nodegraph") / "queue.sqlite3"
# How long a thread computing in Python keeps the GIL from one that waits for it (Python's default
# is 5 ms). The event loop waits for it after every await that blocked (a request arriving, a
# validation coming back) while the worker thread runs a node's Python code: at 5 ms that wait made
# most of `POST /prompt`'s latency under load (bench/soak.py). Only a contended GIL switches sooner.
GIL_SWITCH_INTERVAL_S = 0.0005
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


WorkerFactory = Callable[..., PromptWorker]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad requests get their prepared 4xx; a storage fault its own status; a handler bug a 500
    with a message, not a traceback."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return exc.response
    except web.HTTPException:
        raise
    except (HttpProcessingError, RequestPayloadError) as exc:  # unreadable body: encoding, framing
        return undecodable(exc)
    except (OSError, sqlite3.OperationalError) as exc:
        known = storage_error(exc, request.path)
        if known is not None:
            log.warning("%s %s: %s", request.method, request.path, exc)
            return known
        return _bug(request, exc)
    except Exception as exc:
        return _bug(request, exc)


def _bug(request: web.Request, exc: Exception) -> web.Response:
    log.exception("%s %s failed", request.method, request.path, exc_info=exc)
    return error(
        500,
        "server_error",
        f"{request.method} {request.path} failed: {exc}",
        "this is a bug in nodegraph; the server log has the details",
    )


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    """Browsers must take every Content-Type as sent: a sniffed upload could turn into a page."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


def _mirror(app: web.Application, defs: Iterable[web.AbstractRouteDef]) -> None:
    """Register every route at `/path` and `/api/path`, as ComfyUI does."""
    for route in defs:
        if not isinstance(route, web.RouteDef):
            route.register(app.router)
            continue
        for prefix in ("", "/api"):
            web.RouteDef(route.method, prefix + route.path, route.handler, route.kwargs).register(app.router)


def create_app(
    engine: Engine, *, max_upload_size: int | None = None, workers: WorkerFactory | None = None
) -> web.Application:
    """The server for `engine`: its queue file under the user directory, its worker thread, every route.

    Args:
        engine: the built engine (`nodegraph.engine.build_engine`): settings, env, registry, executor.
        max_upload_size: the largest upload or request body, in bytes (default: the settings'
            `max_upload_size_mb`, else 100 MB).
        workers: builds what runs the prompts, with `Worker`'s constructor arguments (default: one
            `Worker` thread on `engine`; `ray_pool.worker_factory` gives Ray workers).
    """
    settings = engine.settings
    if max_upload_size is None:
        size_mb = settings.max_upload_size_mb
        max_upload_size = int(size_mb * 1024 * 1024) if size_mb else MAX_UPLOAD_SIZE
    listen = settings.listen or "127.0.0.1"
    token = effective_token(listen, settings.auth_token)
    store = PromptStore(Path(engine.env.folders.user_dir) / QUEUE_FILE)
    _settle_recovered(store, engine)
    # The parts are built in order, each given only what it needs, so none refers back to the state.
    wake = Waiters()
    hub = Hub(partial(server_features, max_upload_size))
    worker = (workers or Worker)(
        store,
        engine.executor,
        hub,
        wake.resolve_from_thread,
        engine.free,
        partial(trim_temp, Path(engine.env.folders.temp_dir)),
    )
    st = ServerState(engine, store, hub, worker, token, max_upload_size=max_upload_size, wake=wake)
    st.max_queue = settings.max_queue_size or None
    hub.on_connect = worker.on_connect
    hub.current_status = lambda: status_message(store.remaining())

    cors = settings.enable_cors_header or None
    # loopback only, no token: the Host check is what keeps rebinding pages out
    access = token_middleware(token) if token is not None else loopback_host_middleware
    api_auth = settings.api_auth
    if isinstance(api_auth, str) and api_auth:
        access = with_api_auth(access, parse_credentials(api_auth), token is not None)
    middlewares: list[Middleware] = [
        access,
        error_middleware,
        origin_check(cors),  # the Origin check stays; only the configured origin is let through
    ]
    if cors:  # the allowed origin's preflights are answered before the token check
        middlewares.insert(0, cors_middleware(cors))
    middlewares.insert(0, host_middleware)  # outermost: every check after it reads a well-formed Host
    app = web.Application(client_max_size=max_upload_size + (1 << 20), middlewares=middlewares)
    app.on_response_prepare.append(_nosniff)
    app[STATE] = st
    app[routes_lora.ENV] = engine.env
    folders = engine.env.folders
    roots = {
        "input": Path(folders.input_dir),
        "output": Path(folders.output_dir),
        "temp": Path(folders.temp_dir),
    }
    app[routes_v2.V2_ASSETS] = AssetIndex(Path(folders.user_dir) / ASSETS_FILE, roots)
    tables = (
        routes_prompt, routes_files, routes_info, routes_user, routes_jobs, routes_a1111, routes_a1111_extra,
        routes_images, routes_lora, routes_train, routes_v2, routes_v2_assets,
    )  # fmt: skip
    for table in (module.routes for module in tables):
        _mirror(app, table)
    app.router.add_get("/ws", hub.handle)
    app.router.add_get("/api/ws", hub.handle)
    frontend.add_frontend_routes(app, engine)
    app.on_startup.append(_startup)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


def _settle_recovered(store: PromptStore, engine: Engine) -> None:
    """Fail, instead of re-running, the requeued prompts holding a node that asks so (`Node.after_crash`)."""
    registry = engine.registry
    for item in [i for i in store.pending() if i.prompt_id in store.recovered]:
        for node_id, node in item.prompt.items():
            cls = registry.get(str(node.get("class_type"))) if isinstance(node, dict) else None
            if cls is None:
                continue
            constants = {k: v for k, v in dict(node.get("inputs") or {}).items() if not isinstance(v, list)}
            try:
                reason = cls.after_crash(engine.env, **constants)
            except Exception:  # noqa: BLE001 - a failing report must not keep the server from starting
                log.exception("%s.after_crash failed; the prompt is failed with a plain message", cls.NODE_ID)
                reason = f"the server stopped while {cls.NODE_ID} was running; it is not run again on its own"
            if reason:
                store.fail_recovered(item.prompt_id, reason, str(node_id), cls.NODE_ID)
                log.warning("prompt %s was running when the server stopped: %s", item.prompt_id, reason)
                break


async def _startup(app: web.Application) -> None:
    st = app[STATE]
    st.wake.loop = asyncio.get_running_loop()
    st.switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(GIL_SWITCH_INTERVAL_S, st.switch_interval))
    warm_up = st.engine.warm_up
    if warm_up is not None:
        # First-time imports of model libraries hold the GIL for up to a second at a time; done
        # here, before the socket listens, they cannot stall a request during the first model load.
        await asyncio.to_thread(warm_up)
    await asyncio.to_thread(clear_temp, Path(st.engine.env.folders.temp_dir))
    await st.hub.start()
    if st.store.recovered:
        log.warning(
            "requeued %d prompt(s) that were running when the server stopped", len(st.store.recovered)
        )
    await asyncio.to_thread(st.worker.start)  # Ray workers take a while to build their engines


async def _shutdown(app: web.Application) -> None:
    st = app[STATE]
    await asyncio.to_thread(st.worker.stop)
    await st.hub.stop()


async def _cleanup(app: web.Application) -> None:
    st = app[STATE]
    st.wake.cancel_all()
    st.validator.shutdown(wait=False, cancel_futures=True)
    st.store.close()
    app[routes_v2.V2_ASSETS].close()
    await asyncio.to_thread(clear_temp, Path(st.engine.env.folders.temp_dir))
    if st.switch_interval is not None:  # the process's own again (tests run many apps in one)
        sys.setswitchinterval(st.switch_interval)
