"""A real server on a free loopback port, in a background thread, for clients that speak plain HTTP/WS."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from aiohttp import web

from nodegraph.server import create_app


class LiveServer:
    """Start with `start()`, stop with `stop()` (a graceful shutdown, as Ctrl-C gives)."""

    def __init__(self, engine: Any, workers: Any = None) -> None:
        self.engine = engine
        self.workers = workers
        self.port = 0
        self.app: web.Application | None = None
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LiveServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(600)
        return self

    async def _start(self) -> None:
        self.app = create_app(self.engine, workers=self.workers)
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_json(address: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """GET (or POST when `body` is given) with urllib, the way simple ComfyUI scripts do it."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{address}{path}", data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def wait_history(address: str, prompt_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = http_json(address, f"/history/{prompt_id}").get(prompt_id)
        if entry:  # in the history once finished (ComfyUI's rule), `{}` before
            return dict(entry)
        time.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def status_of(
    address: str, path: str, headers: dict[str, str] | None = None, data: bytes | None = None
) -> int:
    """The HTTP status of a request (errors included), without raising."""
    request = urllib.request.Request(f"http://{address}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
