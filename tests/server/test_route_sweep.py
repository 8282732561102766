"""Every route of the app (read from its router, not a hand list) with hostile input: never a 5xx.

Hostile path segments (names over the file system's limit, NUL, undecodable bytes, deep paths),
queries (absurd numbers, odd names) and bodies (deep JSON, invalid UTF-8, non-finite numbers, bad
multipart, undecodable encodings) go to every method each route has. Bad model files sit in the
LoRA folder (D11). A 5xx anywhere fails, naming the request.
"""

from __future__ import annotations

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
