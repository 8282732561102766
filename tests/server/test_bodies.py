"""Whole request bodies over a real socket (D1), multipart bounded in total (D8), undecodable bodies."""

from __future__ import annotations

import gzip
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from nodegraph.server import create_app
from tests.server.live import LiveServer, http_json
from tests.server.stubs import make_engine, txt2img


def send_segmented(address: str, head: str, segments: list[bytes], delay: float = 0.05) -> tuple[int, bytes]:
    """Send a request's head, then its body in `segments` `delay` seconds apart; (status, body)."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        for segment in segments:
            time.sleep(delay)
            sock.sendall(segment)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < _expected(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


def _expected(reply: bytes) -> int:
    head, _, _ = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return 1 << 62


def _chunked(parts: list[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


def _split(data: bytes, n: int) -> list[bytes]:
    step = -(-len(data) // n)
    return [data[i : i + step] for i in range(0, len(data), step)]


def test_bodies_sent_in_delayed_segments_arrive_whole(tmp_path: Path) -> None:
    workflow = json.dumps({"nodes": [{"id": i, "title": "x" * 40} for i in range(1000)]}).encode()
    prompt = json.dumps({"prompt": txt2img(), "extra_data": {"pad": "y" * 60_000}}).encode()
    with LiveServer(make_engine(tmp_path)) as server:
        addr = server.address
        head = "POST /userdata/workflows%2Fw.json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += f"Content-Length: {len(workflow)}\r\n\r\n"
        status, _ = send_segmented(addr, head, _split(workflow, 4))
        assert status == 200
        stored = tmp_path / "user" / "default" / "workflows" / "w.json"
        assert stored.read_bytes() == workflow  # was cut to the first segment, with a 200
        head = "POST /userdata/c.json HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        status, _ = send_segmented(addr, head, _chunked(_split(workflow, 3)))
        assert status == 200 and (tmp_path / "user" / "default" / "c.json").read_bytes() == workflow
        head = f"POST /prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(prompt)}\r\n\r\n"
        status, body = send_segmented(addr, head, _split(prompt, 5))
        assert status == 200, body
        assert "prompt_id" in json.loads(body)
        head = "POST /settings HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        settings = json.dumps({"Comfy.Big": "z" * 300_000}).encode()
        status, _ = send_segmented(addr, head, _chunked(_split(settings, 3)))
        assert status == 200 and http_json(addr, "/settings")["Comfy.Big"] == "z" * 300_000


def test_a_chunked_body_over_the_limit_is_refused(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_upload_size_mb=0.01)  # 10 KB
    with LiveServer(engine) as server:
        head = "POST /userdata/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        status, body = send_segmented(server.address, head, _chunked([b"a" * 8000] * 3), delay=0.01)
        assert status == 413 and b"request_too_large" in body
        assert not (tmp_path / "user" / "default" / "big.bin").exists()


MULTI = {"Content-Type": "multipart/form-data; boundary=XyZ"}


def _parts(n: int, size: int) -> bytes:
    part = b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\n\r\n%s\r\n'
    text = b"".join(part % (i, b"t" * size) for i in range(n))
    return text + b"--XyZ--\r\n"


@pytest.mark.asyncio
async def test_multipart_is_bounded_in_total_not_per_part(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path), max_upload_size=10_000))

    async def chunked(data: bytes) -> Any:
        async def gen() -> Any:
            for piece in _split(data, 8):
                yield piece

        return await client.post("/upload/image", data=gen(), headers=MULTI)

    resp = await chunked(_parts(8, 9_000))  # each part under the limit, the total far over it
    assert resp.status == 413, await resp.text()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nabc',  # cut
        b"garbage without any boundary",
        b"--XyZ\r\nno headers at all\r\n\r\n--XyZ--\r\n",
    ],
)
async def test_malformed_multipart_is_a_400(aiohttp_client: Any, engine: Any, body: bytes) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    resp = await client.post("/upload/image", data=body, headers=MULTI)
    assert 400 <= resp.status < 500, await resp.text()
    nobound = await client.post("/upload/image", data=b"x", headers={"Content-Type": "multipart/form-data"})
    assert nobound.status == 400


@pytest.mark.asyncio
async def test_undecodable_and_deep_bodies_are_400s(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    for encoding in ("gzip", "deflate", "br", "x-unknown"):
        resp = await client.post("/prompt", data=b"not compressed", headers={"Content-Encoding": encoding})
        assert resp.status in (400, 415), (encoding, resp.status)
    good = gzip.compress(json.dumps({"prompt": txt2img()}).encode())
    assert (await client.post("/prompt", data=good, headers={"Content-Encoding": "gzip"})).status == 200
    for depth in (1_000, 100_000):
        deep = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
        for route in ("/prompt", "/settings", "/queue", "/history", "/interrupt", "/free"):
            resp = await client.post(route, data=deep)
            assert resp.status == 400 and "nests deeper" in (await resp.json())["error"]["message"], route
