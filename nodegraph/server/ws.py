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
# At most one queue-size `status` per interval goes to every socket; the newest one always goes.
# Each broadcast is a frame per socket on the event loop: with 500 sockets and a busy queue,
# one per queue change took more of the loop than the prompts being queued (bench/soak.py).
STATUS_INTERVAL_S = 0.2
OUTBOX_LIMIT = 5000  # frames a client may fall behind before it is dropped (it can reconnect)


@dataclass
class Client:
    """One socket and its own outbox, so a slow reader delays only itself."""

    socket: web.WebSocketResponse
    feature_flags: dict[str, Any] = field(default_factory=dict)
    outbox: asyncio.Queue[str | bytes | None] = field(default_factory=lambda: asyncio.Queue(OUTBOX_LIMIT))
    sender: asyncio.Task[None] | None = None  # the task draining the outbox
    sending_since: float | None = None  # loop time the unfinished send began


# (message, target sid or None for "the prompt had no client")
Outgoing = tuple[Message | PreviewFrame, str | None]


class Hub:
    """Connected websocket clients by session id, and the ordered outgoing message queue."""

    def __init__(self, server_features: Callable[[], dict[str, Any]]) -> None:
        self.clients: dict[str, Client] = {}
        self.server_features = server_features
        self.on_connect: Callable[[str], list[Message]] = lambda sid: []
        # The status as it is when sent (set by the server): statuses are queued from several
        # threads, so the last one queued may hold an older count than one queued before it.
        self.current_status: Callable[[], Message] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Outgoing | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[Any]] = set()
        self._status_seq = 0  # written from any thread; a stale read only sends one extra status
        self._status: Message | None = None  # the newest status not yet sent
        self._status_timer: asyncio.TimerHandle | None = None
        self._status_sent_at = -STATUS_INTERVAL_S

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._publish())
        self._watchdog = asyncio.create_task(self._watch_sends())

    async def stop(self) -> None:
        if self._queue is not None and self._task is not None:
            self._queue.put_nowait(None)
            await self._task
        if self._status_timer is not None:
            self._status_timer.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
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
        every socket; each replaces the one before, so only the newest queued status is sent, and
        at most one per `STATUS_INTERVAL_S` (the first at once, the last one always).
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
        """Send a client's frames in order until its socket closes (or `_watch_sends` stops it)."""
        client.sender = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while (frame := await client.outbox.get()) is not None:
            client.sending_since = loop.time()
            try:
                if isinstance(frame, bytes):
                    await client.socket.send_bytes(frame)
                else:
                    await client.socket.send_str(frame)
            except (ConnectionError, RuntimeError) as exc:
                log.info("websocket send failed (%s); closing that socket", exc)
                await client.socket.close()
                return
            finally:
                client.sending_since = None

    async def _watch_sends(self) -> None:
        """Drop every socket whose send has not finished in `SEND_TIMEOUT_S` (a peer that stopped
        reading). One timer for all sockets: a timeout around each send cost a task and a timer per
        frame, most of a broadcast's time with hundreds of sockets."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, SEND_TIMEOUT_S / 4))
            now = loop.time()
            for client in list(self.clients.values()):
                since = client.sending_since
                if since is not None and now - since > SEND_TIMEOUT_S:
                    log.info("a websocket send took over %.0f s; closing that socket", SEND_TIMEOUT_S)
                    self._drop(client)

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
            if isinstance(message, Message) and message.seq:
                if message.seq >= self._status_seq:  # else a newer status is queued behind this one
                    self._throttle_status(message)
                continue
            targets = self._targets(message, sid)
            if isinstance(message, PreviewFrame):
                # each socket gets the one of the two kinds it reads
                readers = [c for c in targets if _wants_metadata(c, sid) == message.with_metadata]
                frame = encode_preview(message) if readers else b""
                for client in readers:
                    self._offer(client, frame)
            elif targets:
                text = _text(message)  # encoded once for every socket
                for client in targets:
                    self._offer(client, text)
            await asyncio.sleep(0)  # let the senders drain between messages of a burst

    def _throttle_status(self, message: Message) -> None:
        """Send this status now, or as the newest one when the interval since the last has passed."""
        self._status = message
        if self._status_timer is not None:
            return  # a send is scheduled: it takes the newest status
        assert self._loop is not None
        wait = self._status_sent_at + STATUS_INTERVAL_S - self._loop.time()
        if wait <= 0:
            self._send_status()
        else:
            self._status_timer = self._loop.call_later(wait, self._send_status)

    def _send_status(self) -> None:
        assert self._loop is not None
        message, self._status, self._status_timer = self._status, None, None
        if message is None:
            return
        if self.current_status is not None:
            message = self.current_status()
        self._status_sent_at = self._loop.time()
        text = _text(message)  # encoded once for every socket
        for client in list(self.clients.values()):
            self._offer(client, text)

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
            self._drop(client)

    def _drop(self, client: Client) -> None:
        """Forget a client, stop its sender and close its socket (without waiting on a stuck peer)."""
        for sid, known in list(self.clients.items()):
            if known is client:
                del self.clients[sid]
        if client.sender is not None:
            client.sender.cancel()
        closing = asyncio.get_running_loop().create_task(client.socket.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


def _wants_metadata(client: Client, sid: str | None) -> bool:
    """Type-4 previews for a prompt's own client that asked for them; type 1 otherwise (ComfyUI checks
    the flag of the prompt's client id, so a prompt without one sends type 1 to every socket)."""
    return sid is not None and bool(client.feature_flags.get("supports_preview_metadata"))


def _text(message: Message) -> str:
    return json.dumps({"type": message.type, "data": message.data}, default=str)
