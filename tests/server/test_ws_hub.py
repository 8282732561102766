"""The websocket hub on its own: a client that stops reading is dropped; the others get everything."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodegraph.server import ws as ws_module
from nodegraph.server.messages import Message
from nodegraph.server.ws import Client, Hub

pytestmark = pytest.mark.asyncio


class FakeSocket:
    """Stands in for a WebSocketResponse; `stuck` never finishes a send, like a peer that stopped reading."""

    def __init__(self, stuck: bool = False) -> None:
        self.stuck = stuck
        self.sent: list[Any] = []
        self.closed = False

    async def send_str(self, text: str) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        self.sent.append(text)

    async def close(self) -> None:
        self.closed = True


async def test_a_stuck_reader_is_dropped_and_does_not_delay_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_module, "SEND_TIMEOUT_S", 0.05)
    hub = Hub(dict)
    await hub.start()
    stuck, fast = FakeSocket(stuck=True), FakeSocket()
    slow_client, fast_client = Client(stuck), Client(fast)  # type: ignore[arg-type]
    hub.clients = {"slow": slow_client, "fast": fast_client}
    drains = [asyncio.create_task(hub._drain(c)) for c in (slow_client, fast_client)]
    for i in range(10):
        hub.send_sync(Message("note", {"i": i}, broadcast=True), None)
    for _ in range(100):
        if len(fast.sent) == 10 and stuck.closed:
            break
        await asyncio.sleep(0.01)
    assert len(fast.sent) == 10 and '"i": 9' in fast.sent[-1]
    assert stuck.closed and stuck.sent == [] and "fast" in hub.clients
    for task in drains:
        task.cancel()
    await hub.stop()


async def test_only_the_newest_queued_status_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub(dict)
    await hub.start()
    sock = FakeSocket()
    client = Client(sock)  # type: ignore[arg-type]
    hub.clients = {"c": client}
    drain = asyncio.create_task(hub._drain(client))
    for n in range(5):
        hub.broadcast_sync(Message("status", {"status": {"exec_info": {"queue_remaining": n}}}))
    await asyncio.sleep(0.1)
    assert len(sock.sent) == 1 and '"queue_remaining": 4' in sock.sent[0]
    drain.cancel()
    await hub.stop()


async def test_a_status_says_the_queue_size_when_it_is_sent() -> None:
    """Statuses are queued from several threads; the one sent last must not carry an older count."""
    hub = Hub(dict)
    await hub.start()
    sock = FakeSocket()
    client = Client(sock)  # type: ignore[arg-type]
    hub.clients = {"c": client}
    drain = asyncio.create_task(hub._drain(client))
    size = [7]
    hub.current_status = lambda: Message("status", {"status": {"exec_info": {"queue_remaining": size[0]}}})
    hub.broadcast_sync(Message("status", {"status": {"exec_info": {"queue_remaining": 6}}}))  # stale
    await asyncio.sleep(0.05)
    size[0] = 3
    hub.broadcast_sync(Message("status", {"status": {"exec_info": {"queue_remaining": 4}}}))
    await asyncio.sleep(ws_module.STATUS_INTERVAL_S + 0.1)  # the second waits out the interval
    assert ['"queue_remaining": 7' in t for t in sock.sent] == [True, False]
    assert '"queue_remaining": 3' in sock.sent[1]
    drain.cancel()
    await hub.stop()
