"""The websocket hub: `/ws?clientId=`, and the bridge from the worker thread to the event loop.

The worker never touches a socket. It calls `Hub.send_sync`, which hands the message to the event
loop with `call_soon_threadsafe`; one publisher task sends queued messages in order (ComfyUI's
`send_sync` / `publish_loop`). A socket that fails to receive is dropped, never the publisher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from nodegraph.server.messages import Message, PreviewFrame, encode_preview

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0
OUTBOX_LIMIT = 5000  # frames a client may fall behind before it is dropped (it can reconnect)


@dataclass
class Client:
    """One socket and its own outbox, so a slow reader delays only itself."""

    socket: web.WebSocketResponse
    feature_flags: dict[str, Any] = field(default_factory=dict)
    outbox: asyncio.Queue[str | bytes | None] = field(default_factory=lambda: asyncio.Queue(OUTBOX_LIMIT))


# (message, target sid or None for "the prompt had no client")
Outgoing = tuple[Message | PreviewFrame, str | None]


class Hub:
    """Connected websocket clients by session id, and the ordered outgoing message queue."""

    def __init__(self, server_features: Callable[[], dict[str, Any]]) -> None:
        self.clients: dict[str, Client] = {}
        self.server_features = server_features
        self.on_connect: Callable[[str], list[Message]] = lambda sid: []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Outgoing | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._status_seq = 0  # written from any thread; a stale read only sends one extra status

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._publish())

    async def stop(self) -> None:
        if self._queue is not None and self._task is not None:
            self._queue.put_nowait(None)
            await self._task
        for client in list(self.clients.values()):
            await client.socket.close()
        self.clients.clear()

    def send_sync(self, message: Message | PreviewFrame, sid: str | None) -> None:
        """Queue a message from any thread. `sid` None means the prompt had no client."""
        if self._loop is None or self._queue is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (message, sid))
        except RuntimeError:  # the loop closed between the check and the call: shutting down
            pass

    def broadcast_sync(self, message: Message) -> None:
        """Queue a message for every socket (the `status` message).

        A burst of queue changes (50 clients posting at once) would send one status per change to
        every socket; only the newest queued status is sent, since each replaces the one before.
        """
        self._status_seq += 1
        self.send_sync(Message(message.type, message.data, broadcast=True, seq=self._status_seq), None)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        """`GET /ws?clientId=`: a new or replacing socket for that session id."""
        sock = web.WebSocketResponse(heartbeat=30.0, max_msg_size=1 << 20)
        await sock.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        client = Client(sock)
        old, self.clients[sid] = self.clients.get(sid), client
        if old is not None:  # the same clientId again (a page reload): the new socket replaces it
            await old.socket.close()
        for message in self.on_connect(sid):
            client.outbox.put_nowait(_text(message))
        sender = asyncio.create_task(self._drain(client))
        try:
            async for msg in sock:
                if msg.type == WSMsgType.TEXT:
                    self._client_message(client, msg.data)
        finally:
            if self.clients.get(sid) is client:
                del self.clients[sid]
            sender.cancel()
        return sock

    async def _drain(self, client: Client) -> None:
        """Send a client's frames in order until its socket closes."""
        while (frame := await client.outbox.get()) is not None:
            try:
                if isinstance(frame, bytes):
                    await asyncio.wait_for(client.socket.send_bytes(frame), SEND_TIMEOUT_S)
                else:
                    await asyncio.wait_for(client.socket.send_str(frame), SEND_TIMEOUT_S)
            except (ConnectionError, RuntimeError, asyncio.TimeoutError) as exc:
                log.info("websocket send failed (%s); closing that socket", exc)
                await client.socket.close()
                return

    def _client_message(self, client: Client, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            return  # ComfyUI ignores what it does not understand; so do we
        if isinstance(data, dict) and data.get("type") == "feature_flags":
            if isinstance(data.get("data"), dict):
                client.feature_flags = data["data"]
            self._offer(client, json.dumps({"type": "feature_flags", "data": self.server_features()}))

    async def _publish(self) -> None:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            if item is None:
                return
            message, sid = item
            if isinstance(message, Message) and message.seq and message.seq < self._status_seq:
                continue  # a newer status is already queued behind this one
            targets = self._targets(message, sid)
            if isinstance(message, PreviewFrame):
                for client in targets:
                    self._offer(
                        client,
                        encode_preview(message, bool(client.feature_flags.get("supports_preview_metadata"))),
                    )
            elif targets:
                text = _text(message)  # encoded once for every socket
                for client in targets:
                    self._offer(client, text)
            await asyncio.sleep(0)  # let the senders drain between messages of a burst

    def _targets(self, message: Message | PreviewFrame, sid: str | None) -> list[Client]:
        if sid is not None:
            client = self.clients.get(sid)
            return [client] if client is not None else []
        return list(self.clients.values()) if message.broadcast else []

    def _offer(self, client: Client, frame: str | bytes) -> None:
        try:
            client.outbox.put_nowait(frame)
        except asyncio.QueueFull:  # it stopped reading: drop it rather than hold memory for it
            log.warning("a websocket client fell %d messages behind; closing it", OUTBOX_LIMIT)
            for sid, known in list(self.clients.items()):
                if known is client:
                    del self.clients[sid]
            asyncio.get_running_loop().create_task(client.socket.close())


def _text(message: Message) -> str:
    return json.dumps({"type": message.type, "data": message.data}, default=str)
