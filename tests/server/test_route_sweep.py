"""Every route of the app (read from its router, not a hand list) with hostile input: never a 5xx.

Hostile path segments (names over the file system's limit, NUL, undecodable bytes, deep paths,
symlinks that lead out), queries (absurd numbers, odd names), headers (huge, malformed
Idempotency-Key, Last-Event-ID, Range) and bodies (deep JSON, invalid UTF-8, non-finite numbers,
bad multipart, undecodable encodings, bodies over the limit with and without Content-Length) go to
every method each route has. Bad model files sit in the LoRA and checkpoint folders (D11). A 5xx, a
request that takes longer than `REQUEST_S`, a file left half-written, a file written outside the
served folders or a byte of the file outside them fails, naming the request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from nodegraph.server import create_app
from tests.server.stubs import make_engine

pytestmark = pytest.mark.asyncio

REQUEST_S = 20.0  # the longest any one request may take: none of them has real work to do
LIMIT = 256 * 1024  # the sweep's body limit, so a body over it is cheap to send
SECRET = "nodegraph-sweep-secret-7f3a"
SEGMENTS = [
    "x" * 300, "a%00b", "%ff%fe", "..%2f..%2fetc", "d/" * 40 + "f", "%F0%9F%98%80" * 70, "1",
    "link.png", "linkdir%2Fsecret.txt", "..%2Foutside%2Fsecret.txt", "%2Fetc%2Fpasswd",
]  # fmt: skip
QUERIES = [
    "?max_items=99999999999999999999&offset=-5&filename={s}&subfolder={s}&type=input"
    "&preview=webp;x&channel=a&dir={s}&path={s}&name={s}&timeout=nan&wait=true&recurse=true"
    "&limit=99999999999999999999&checkpoint={s}&status={s}&sort_by={s}&metadata%5Ba%5D={s}",
    "?limit=-1&offset=99999999999999999999&max_items=1e20&filename=link.png&type=input&preview=png"
    "&checkpoint=deep.safetensors&status=queued,%00&sort_order=x&workflow_id={s}&token=x&timeout=1e999",
    "?limit=nan&offset=nan&filename=secret.txt&subfolder=linkdir&type=output&dir=..%2F..&wait=1&timeout=-1",
]
BODIES: list[tuple[Any, dict[str, str]]] = [
    (b"[" * 5000 + b"]" * 5000, {"Content-Type": "application/json"}),
    (b'{"prompt": {"1": {"class_type": "StubSeed", "inputs": {"seed": 1}}}, "number": 1e999}', {}),
    (b'{"a": NaN, "settings": {"x": Infinity}, "extra_data": {"y": -1e999}}', {}),
    (b"[]", {"Content-Type": "application/json"}),
    (b'"x"', {"Content-Type": "application/json"}),
    (b"null", {"Content-Type": "application/json"}),
    (b"\xff\xfe{\x00}", {"Content-Type": "text/plain; charset=utf-16"}),
    # aiohttp drops the connection after answering when an unread body cannot be decoded
    (b"not gzip", {"Content-Encoding": "gzip", "Connection": "close"}),
    (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a\x00b.png\"\r\n\r\nx",
     {"Content-Type": "multipart/form-data; boundary=B"}),
    (b"--B\r\nContent-Disposition: form-data; name=\"file_path\"\r\n\r\n\xff\xfe\r\n--B--\r\n",
     {"Content-Type": "multipart/form-data; boundary=B"}),
    (b"x", {"Content-Type": "multipart/form-data"}),  # no boundary
    (b"{" + b" " * (LIMIT + 10) + b"}", {"Content-Type": "application/json"}),  # over the limit
    ("chunked", {"Content-Type": "application/json"}),  # over the limit, no Content-Length
]  # fmt: skip
HEADERS = {
    "Idempotency-Key": "k" * 300,
    "Last-Event-ID": "-1" + "\u00e9" * 40 + "x" * 4000,
    "Range": "bytes=99999999999999999999-",
    "If-Modified-Since": "yesterday",
    "If-None-Match": "*" * 2000,
    "Accept-Encoding": "x" * 4000,
    "Content-Type": "application/json; charset=x-unknown",
    "Cookie": "nodegraph_token=" + "%" * 2000,
}
# The routes of issue 15: the sweep must reach each of them (a renamed route fails here, not silently).
NEW_ROUTES = {
    ("POST", "/sdapi/v1/extra-batch-images"), ("POST", "/sdapi/v1/img2img"),
    ("GET", "/nodegraph/train/defaults"), ("GET", "/nodegraph/train/datasets"),
    ("POST", "/v2/jobs"), ("GET", "/v2/jobs"), ("GET", "/v2/jobs/{id}"), ("GET", "/v2/jobs/{id}/events"),
    ("POST", "/v2/jobs/{id}/cancel"), ("GET", "/v2/jobs/{id}/workflow"), ("GET", "/v2/health"),
    ("POST", "/v2/assets"), ("POST", "/v2/assets/from-hash"), ("HEAD", "/v2/assets/by-hash/{hash}"),
    ("GET", "/v2/assets/{id}"), ("GET", "/v2/assets/{id}/content"), ("DELETE", "/v2/assets/{id}"),
    ("GET", "/jobs"), ("GET", "/jobs/{job_id}"), ("POST", "/jobs/{job_id}/cancel"), ("POST", "/jobs/cancel"),
    ("GET", "/features"), ("GET", "/global_subgraphs"), ("GET", "/global_subgraphs/{subgraph_id}"),
    ("GET", "/node_replacements"), ("POST", "/models/download"), ("GET", "/models/download/{batch_id}"),
}  # fmt: skip


def _bad_models(base: Path) -> None:
    """LoRAs and checkpoints whose headers are deep JSON, a list, or claim 2**62 bytes (D4, D11)."""
    for folder in ("loras", "checkpoints"):
        models = base / "models" / folder
        models.mkdir(parents=True, exist_ok=True)
        for name, header in (
            ("deep.safetensors", b"[" * 100_000 + b"]" * 100_000),
            ("metalist.safetensors", b'{"__metadata__": ["x"]}'),
            ("huge.safetensors", None),
        ):
            data = struct.pack("<Q", 1 << 62) if header is None else struct.pack("<Q", len(header)) + header
            (models / name).write_bytes(data)


def _plant_escapes(base: Path) -> Path:
    """A secret outside every served folder, and symlinks to it from input/, output/ and user/."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.png").write_text(SECRET)
    for folder, link, target in (
        ("input", "link.png", outside / "secret.png"),
        ("input", "linkdir", outside),
        ("output", "linkdir", outside),
        ("output", "link.png", outside / "secret.png"),
        ("user/default", "link.json", outside / "secret.txt"),
        ("user/default", "linkdir", outside),
    ):
        (base / folder).mkdir(parents=True, exist_ok=True)
        os.symlink(target, base / folder / link)
    return outside


def swept_routes(app: web.Application) -> list[tuple[str, web.AbstractResource]]:
    """(method, resource) for every route, once: not aiohttp's automatic HEAD for a GET, not the
    `/api` copy of a route also served without it (the same handler), but every route only under
    `/api` and every HEAD-only route."""
    routes = [r for r in app.router.routes() if r.resource is not None]
    canon = {(r.method, r.resource.canonical, r.handler) for r in routes}  # type: ignore[union-attr]
    gets = {r.resource.canonical for r in routes if r.method == "GET"}  # type: ignore[union-attr]
    found = []
    for route in routes:
        resource = route.resource
        assert resource is not None
        path = resource.canonical
        if route.method == "HEAD" and path in gets:
            continue
        if path.startswith("/api/") and (route.method, path[4:], route.handler) in canon:
            continue
        found.append((route.method, resource))
    return found


def _paths(resource: web.AbstractResource) -> list[str]:
    info = resource.get_info()
    if "path" in info:
        return [str(info["path"])]
    formatter = str(info.get("formatter") or info.get("prefix") or "")
    if "prefix" in info:  # a static folder: hostile names under it
        return [f"{formatter}/{s}" for s in SEGMENTS]
    return [re.sub(r"\{[^}]+\}", s, formatter) for s in SEGMENTS]


async def _over_limit() -> AsyncIterator[bytes]:
    for _ in range(LIMIT // 8192 + 8):
        yield b" " * 8192


def _requests(method: str, path: str, n: int) -> Iterator[tuple[str, str, Any, dict[str, str]]]:
    """(method, url, body, headers) to send to one route path."""
    query = QUERIES[n % len(QUERIES)].format(s=SEGMENTS[n % len(SEGMENTS)])
    method = "GET" if method == "*" else method
    if method in ("GET", "DELETE", "HEAD"):
        yield method, path + query, b"", {}
        yield method, path, b"", HEADERS
        return
    for body, headers in BODIES:
        yield method, path + query, body, headers
    yield method, path, b"{}", HEADERS


async def _send(
    client: TestClient, method: str, url: str, body: Any, headers: dict[str, str]
) -> tuple[int, bytes]:
    data = _over_limit() if body == "chunked" else body or None
    resp = await client.request(method, URL(url, encoded=True), data=data, headers=headers)
    try:
        return resp.status, await resp.read()
    finally:
        resp.release()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


async def test_no_route_answers_hostile_input_with_a_5xx(aiohttp_client: Any, tmp_path: Path) -> None:
    from nodes import register_services

    engine = make_engine(tmp_path)
    register_services(engine.env)  # the LoRA and checkpoint catalogs the server's routes read
    _bad_models(tmp_path)
    outside = _plant_escapes(tmp_path)
    before_outside = _files(outside)
    app = create_app(engine, max_upload_size=LIMIT)
    client: TestClient = await aiohttp_client(app)
    (tmp_path / "user" / "default" / "dirfile").mkdir(parents=True)
    routes = swept_routes(app)
    swept = {(m, r.canonical) for m, r in routes}
    assert NEW_ROUTES <= swept, NEW_ROUTES - swept
    failures: list[str] = []
    seen = 0
    for route_method, resource in routes:
        for path in _paths(resource):
            for method, url, body, headers in _requests(route_method, path, seen):
                label = f"{method} {url[:100]} {str(body)[:40]} {sorted(headers)[:2]}"
                try:
                    status, data = await asyncio.wait_for(
                        _send(client, method, url, body, headers), REQUEST_S
                    )
                except asyncio.TimeoutError:
                    failures.append(f"{label}: no answer in {REQUEST_S} s")
                    continue
                except Exception as exc:
                    raise AssertionError(label) from exc
                seen += 1
                if status >= 500:
                    failures.append(f"{label}: {status} {data[:200]!r}")
                if SECRET.encode() in data:
                    failures.append(f"{label}: answered with the file outside the served folders")
    assert seen > 1000
    assert (await client.get("/queue")).status == 200  # still up
    left = [f for f in _files(tmp_path) if f.endswith((".partial", ".tmp")) or "/.v2-upload-" in f]
    assert not left, f"half-written files left: {left}"
    assert _files(outside) == before_outside, "a file was written outside the served folders"
    assert not (tmp_path.parent / "etc").exists() and not list(tmp_path.parent.glob("*secret*"))
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:60])


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
    _bad_models(tmp_path)
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
