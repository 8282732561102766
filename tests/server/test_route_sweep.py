"""Every route of the app (read from its router, not a hand list) with hostile input: never a 5xx.

Hostile path segments (names over the file system's limit, NUL, undecodable bytes, deep paths),
queries (absurd numbers, odd names) and bodies (deep JSON, invalid UTF-8, non-finite numbers, bad
multipart, undecodable encodings) go to every method each route has. Bad model files sit in the
LoRA folder (D11). A 5xx anywhere fails, naming the request.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from nodegraph.server import create_app
from tests.server.stubs import make_engine

pytestmark = pytest.mark.asyncio

SEGMENTS = ["x" * 300, "a%00b", "%ff%fe", "..%2f..%2fetc", "d/" * 40 + "f", "%F0%9F%98%80" * 70, "1"]
QUERY = (
    "?max_items=99999999999999999999&offset=-5&filename={s}&subfolder={s}&type=input"
    "&preview=webp;x&channel=a&dir={s}&path={s}&name={s}&timeout=nan&wait=true&recurse=true"
)
BODIES: list[tuple[bytes, dict[str, str]]] = [
    (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}),
    (b'{"prompt": {"1": {"class_type": "StubSeed", "inputs": {"seed": 1}}}, "number": 1e999}', {}),
    (b"\xff\xfe{\x00}", {"Content-Type": "text/plain; charset=utf-16"}),
    # aiohttp drops the connection after answering when an unread body cannot be decoded
    (b"not gzip", {"Content-Encoding": "gzip", "Connection": "close"}),
    (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\x00b.png\"\r\n\r\nx",
     {"Content-Type": "multipart/form-data; boundary=B"}),
]  # fmt: skip


def _bad_loras(base: Path) -> None:
    loras = base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for name, header in (
        ("deep.safetensors", b"[" * 100_000 + b"]" * 100_000),
        ("metalist.safetensors", b'{"__metadata__": ["x"]}'),
        ("huge.safetensors", None),
    ):
        data = struct.pack("<Q", 1 << 62) if header is None else struct.pack("<Q", len(header)) + header
        (loras / name).write_bytes(data)


def _paths(resource: web.AbstractResource) -> list[str]:
    info = resource.get_info()
    if "path" in info:
        return [str(info["path"])]
    formatter = str(info.get("formatter") or info.get("prefix") or "")
    if "prefix" in info:  # a static folder: hostile names under it
        return [f"{formatter}/{s}" for s in SEGMENTS]
    return [re.sub(r"\{[^}]+\}", s, formatter) for s in SEGMENTS]


async def test_no_route_answers_hostile_input_with_a_5xx(aiohttp_client: Any, tmp_path: Path) -> None:
    from nodes import register_services

    engine = make_engine(tmp_path)
    register_services(engine.env)  # the LoRA catalog the server's LoRA routes read
    _bad_loras(tmp_path)
    app = create_app(engine)
    client: TestClient = await aiohttp_client(app)
    (tmp_path / "user" / "default" / "dirfile").mkdir(parents=True)
    failures: list[str] = []
    seen = 0
    last: Any = None
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS") or route.resource is None:
            continue
        for path in _paths(route.resource):
            if path.startswith("/api/") or path in ("/ws",):
                continue  # the /api mirror runs the same handlers; /ws is the websocket
            query = QUERY.format(s=SEGMENTS[seen % len(SEGMENTS)])
            targets = [(b"", {})] if route.method in ("GET", "DELETE") else BODIES
            for body, headers in targets:
                method = "GET" if route.method == "*" else route.method
                url = URL(path + query, encoded=True)
                try:
                    resp = await client.request(method, url, data=body or None, headers=headers)
                except Exception as exc:
                    raise AssertionError(f"{method} {path[:80]} {body[:40]!r} {last}") from exc
                last = (method, path[:80], body[:30], resp.status, dict(resp.headers))
                seen += 1
                if resp.status >= 500:
                    failures.append(
                        f"{method} {path[:80]} {body[:40]!r}: {resp.status} {(await resp.text())[:200]}"
                    )
                resp.release()
    assert seen > 100
    assert not failures, "\n".join(failures)


# Odd Host values (DNS rebinding sends the attacker's name; these try to slip a loopback name past
# the check): each is a 400 on every route, before any handler or check reads it.
MALFORMED_HOSTS = [
    b"", b"x" * 300, b"x" * 9000, "h\u00e9llo".encode(), "\uff11\uff12\uff17.0.0.1".encode(), b"\xff\xfe",
    b"::1", b"[::1", b"::1]", b"[::1]x", b"[::1%25lo]:{port}", b"evil.example@127.0.0.1:{port}",
    b"127.0.0.1:{port}@evil.example", b"u:p@localhost:{port}", b"127.0.0.1:99999", b"127.0.0.1:abc",
    b"127.0.0.1:", b"127.0.0.1/x", b"127.0.0.1#x", b"127.0.0.1?x", b"127.0.0.1\\x", b"%31%32%37.0.0.1",
    b"127.0.0.1 evil", b"127.0.0.1:{port},evil.example",
]  # fmt: skip
LOOPBACK_HOSTS = [b"127.0.0.1:{port}", b"localhost:{port}", b"LOCALHOST:{port}", b"[::1]:{port}", b"[::1]"]
OTHER_HOSTS = [b"evil.example:{port}", b"127.1", b"2130706433", b"[::ffff:127.0.0.1]:{port}", b"localhost."]


async def _raw(port: int, head: bytes) -> int:
    """Send a request as bytes (the client libraries refuse to send such headers); the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    line = await reader.readline()
    writer.close()
    return int(line.split()[1])


async def _status(port: int, method: str, path: str, host: bytes | None, extra: bytes = b"") -> int:
    hosts = b"" if host is None else b"Host: " + host.replace(b"{port}", str(port).encode()) + b"\r\n"
    return await _raw(port, f"{method} {path} HTTP/1.1\r\n".encode() + hosts + extra)


@pytest.mark.parametrize("token", [None, "tok"])
async def test_odd_host_headers_are_400s_and_never_pass_the_host_and_origin_checks(
    aiohttp_client: Any, tmp_path: Path, token: str | None
) -> None:
    app = create_app(make_engine(tmp_path, auth_token=token))
    client: TestClient = await aiohttp_client(app)
    port = client.server.port
    assert port is not None
    auth = b"Authorization: Bearer tok\r\n" if token else b""
    paths = sorted({p for r in app.router.routes() if r.resource is not None for p in _paths(r.resource)})
    for host in MALFORMED_HOSTS:  # every route: the check stands before routing
        for path in paths[:: max(1, len(paths) // 40)]:
            assert await _status(port, "GET", path, host, auth) == 400, (host, path)
        assert await _status(port, "POST", "/prompt", host, auth) == 400, host
        upgrade = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        assert await _status(port, "GET", "/ws", host, auth + upgrade + b"Sec-WebSocket-Key: eA==\r\n") == 400
    two = [b"Host: 127.0.0.1\r\nHost: evil.example\r\n", b"Host: evil.example\r\nHost: 127.0.0.1\r\n"]
    for hosts in two:  # a repeated Host: refused by aiohttp's parser, as RFC 9112 asks
        assert await _raw(port, b"GET /queue HTTP/1.1\r\n" + hosts + auth) == 400
    assert await _raw(port, b"GET /queue HTTP/1.1\r\n" + auth) == 400  # HTTP/1.1 without Host
    same = b"Origin: http://127.0.0.1:%d\r\n" % port
    evil = b"Origin: http://evil.example:%d\r\n" % port
    for host in LOOPBACK_HOSTS:
        assert await _status(port, "GET", "/queue", host, auth) == 200, host
        assert await _status(port, "POST", "/interrupt", host, auth + evil) == 403, host
    assert await _status(port, "POST", "/interrupt", b"127.0.0.1:{port}", auth + same) == 200
    assert await _status(port, "POST", "/interrupt", b"[::1]:{port}", auth + same) == 403  # another host
    for host in OTHER_HOSTS:  # loopback without a token: only loopback names are served (DNS rebinding)
        assert await _status(port, "GET", "/queue", host, auth) == (200 if token else 403), host
        assert await _status(port, "POST", "/interrupt", host, auth + same) == 403, host
    assert await _status(
        port,
        "GET",
        "/queue",
        None,
        auth,
    ) in (400,)


async def test_one_bad_lora_never_breaks_the_lora_list(aiohttp_client: Any, tmp_path: Path) -> None:
    from nodes import register_services

    engine = make_engine(tmp_path)
    register_services(engine.env)  # the LoRA catalog the server's LoRA routes read
    _bad_loras(tmp_path)
    client: TestClient = await aiohttp_client(create_app(engine))
    listed = await client.get("/nodegraph/loras")
    assert listed.status == 200
    entries = {e["name"]: e for e in await listed.json()}
    assert set(entries) == {"deep.safetensors", "metalist.safetensors", "huge.safetensors"}
    assert all("error" in e for e in entries.values())
    for name in entries:
        one = await client.get("/nodegraph/lora_info", params={"name": name})
        assert one.status == 200 and "error" in await one.json()
        meta = await client.get("/view_metadata/loras", params={"filename": name})
        assert meta.status == 404, json.dumps(await meta.json())
