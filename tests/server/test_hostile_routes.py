"""The routes added since the first hostile-input sweep (issue 15's second pass), one rule per test.

A1111 numbers and images (bounded, named, never decoded past the pixel budget), non-finite numbers
anywhere in a body, `/api/jobs` paging numbers, Comfy API v2 uploads (bounded text fields, served
types, malformed multipart) and Idempotency-Keys, uploads written whole or not at all.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import io
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from PIL import Image

from nodegraph.server import create_app
from tests.server.stubs import make_engine, txt2img
from tests.server.test_route_fields import field_engine, instant_workers, png, png_header

pytestmark = pytest.mark.asyncio


async def test_non_finite_numbers_anywhere_in_a_body_are_refused_naming_where(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """`NaN`, `Infinity` and `1e999` were stored and sent back bare, which no JSON parser reads (D13)."""
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path)))
    for path, raw, where in (
        ("/settings", '{"Comfy.Zoom": NaN}', "Comfy.Zoom"),
        ("/settings/Comfy.Zoom", "-Infinity", "request body holds -Infinity"),
        ("/prompt", '{"prompt": %s, "extra_data": {"pad": [1, 1e999]}}', "extra_data.pad[1]"),
        ("/sdapi/v1/txt2img", '{"steps": 1e999}', "steps"),
        ("/v2/jobs", '{"workflow": %s, "metadata": {"a": NaN}}', "metadata.a"),
    ):
        body = raw.replace("%s", '{"1": {"class_type": "StubSeed", "inputs": {"seed": 1}}}')
        resp = await client.post(path, data=body)
        text = await resp.text()
        assert resp.status == 400 and where in text and "JSON has no such number" in text, (path, text)
    for path in ("/settings", "/queue", "/history", "/api/jobs"):
        text = await (await client.get(path)).text()
        assert "NaN" not in text and "Infinity" not in text, path


async def test_jobs_paging_numbers_over_sqlite_integers_are_400s(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    for query in ("limit=99999999999999999999", "offset=99999999999999999999&limit=1", "limit=4294967296"):
        resp = await client.get(f"/api/jobs?{query}")
        assert resp.status == 400, (query, await resp.text())
        assert query.split("=")[0] in (await resp.json())["error"]
    assert (await client.get("/api/jobs?limit=2147483647&offset=2147483647")).status == 200


async def test_models_download_with_any_shape_is_the_offline_answer(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    for body in (
        {"models": 5},
        {"models": True},
        {"models": "abc"},
        {"models": [1, {"name": "n" * 5000}]},
        [],
    ):
        resp = await client.post("/api/models/download", json=body)
        assert resp.status == 403 and (await resp.json())["error"]["type"] == "offline", body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_a1111_numbers_and_images_are_bounded_and_named(aiohttp_client: Any, tmp_path: Path) -> None:
    """With graphs that validate, `n_iter: 10**9` queued prompts until the request timed out, `1e999`
    and a bomb PNG were 500s, and a 12000 x 12000 PNG (under Pillow's own limit) was decoded."""
    engine = field_engine(tmp_path)
    client: TestClient = await aiohttp_client(create_app(engine, workers=instant_workers))
    base = {"prompt": "a", "steps": 2, "width": 64, "height": 64}
    ok = await client.post("/sdapi/v1/txt2img", json=base)
    assert ok.status == 200, await ok.text()
    for changes, field in (
        ({"n_iter": 10**9}, "n_iter"),
        ({"batch_size": 100_000}, "batch_size"),
        ({"steps": 10**12}, "steps"),
        ({"width": 10**6}, "width"),
        ({"cfg_scale": "nan"}, "cfg_scale"),
        ({"seed": 2**64}, "seed"),
        ({"scheduler": 5}, "scheduler"),
        ({"subseed_strength": "x"}, "subseed_strength"),
        ({"prompt": ["a"]}, "prompt"),
        ({"enable_hr": True, "hr_scale": 1e300}, "hr_scale"),
        ({"enable_hr": True, "hr_resize_x": "wide"}, "hr_resize_x"),
        ({"override_settings": {"CLIP_stop_at_last_layers": "x"}}, "CLIP_stop_at_last_layers"),
    ):
        resp = await asyncio.wait_for(client.post("/sdapi/v1/txt2img", json={**base, **changes}), 30)
        text = await resp.text()
        assert resp.status == 422 and field in text, (changes, resp.status, text[:300])
        assert (await resp.json())["error"] == "HTTPException"  # A1111's class name (was "str")
    queue = await (await client.get("/queue")).json()
    assert queue["queue_pending"] == []  # nothing was queued for a refused request
    images = {"bomb": png_header(65535, 65535), "over the budget": png_header(12000, 12000)}
    for name, data in images.items():
        for route, body in (
            ("/sdapi/v1/img2img", {**base, "init_images": [b64(data)]}),
            ("/sdapi/v1/img2img", {**base, "init_images": [b64(png())], "mask": b64(data)}),
            ("/sdapi/v1/png-info", {"image": b64(data)}),
            ("/sdapi/v1/extra-single-image", {"image": b64(data)}),
            ("/sdapi/v1/extra-batch-images", {"imageList": [{"data": b64(png())}, {"data": b64(data)}]}),
        ):
            resp = await client.post(route, json=body)
            text = await resp.text()
            assert resp.status == 422 and "pixels" in text, (name, route, resp.status, text[:300])
    batch = await client.post("/sdapi/v1/extra-batch-images", json={"imageList": [{"data": b64(png()[:40])}]})
    assert batch.status == 422 and "imageList[0].data" in await batch.text()


async def _v2_upload(client: TestClient, **fields: Any) -> Any:
    form = FormData()
    for name, value in fields.items():
        if isinstance(value, tuple):
            form.add_field(name, value[1], filename=value[0], content_type=value[2])
        else:
            form.add_field(name, value)
    return await client.post("/api/v2/assets", data=form)


async def test_v2_assets_are_served_by_type_never_as_pages(aiohttp_client: Any, engine: Any) -> None:
    """The client's declared `content_type` was served inline: an SVG or HTML upload ran as a page."""
    client: TestClient = await aiohttp_client(create_app(engine))
    page = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
    cases = [
        ({"file": ("a.svg", page, "image/svg+xml"), "file_path": "a.svg"}, "application/octet-stream"),
        ({"file": ("b.png", page + b"1", "image/png"), "file_path": "b.png", "content_type": "text/html"},
         "application/octet-stream"),
        ({"file": ("c.txt", page + b"2", "text/plain"), "file_path": "c.txt",
          "content_type": "image/png\r\nX-Evil: 1"}, "application/octet-stream"),
        ({"file": ("d.png", png(), "image/png"), "file_path": "d.png", "content_type": "image/png"},
         "image/png"),
    ]  # fmt: skip
    for fields, served in cases:
        resp = await _v2_upload(client, **fields)
        assert resp.status in (200, 201, 422), await resp.text()
        if resp.status == 422:  # a control character in a field is refused
            assert "control characters" in await resp.text()
            continue
        content = await client.get(f"/api/v2/assets/{(await resp.json())['id']}/content")
        assert content.status == 200
        assert content.headers["Content-Type"].split(";")[0] == served, fields
        assert content.headers["X-Content-Type-Options"] == "nosniff"
        inline = content.headers["Content-Disposition"].startswith("inline")
        assert inline == (served == "image/png"), content.headers["Content-Disposition"]


async def test_v2_upload_fields_are_bounded_text_and_malformed_bodies_are_400s(
    aiohttp_client: Any, engine: Any
) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    file = ("a.png", png(), "image/png")
    resp = await _v2_upload(client, file=file, file_path="a.png", tags="t" * (1 << 20))
    assert resp.status == 422 and "tags" in await resp.text()  # was kept whole in memory, then 201
    resp = await _v2_upload(client, file=file, file_path=("p", b"\xff\xfe", "text/plain"))
    assert resp.status == 422 and "file_path" in await resp.text()  # was a UnicodeDecodeError (500)
    resp = await _v2_upload(client, file=file)
    assert resp.status == 422 and "Missing the 'file_path' field" in await resp.text()  # was "file_path ''"
    for name in ("x" * 300 + ".png", "d/" * 40 + "a.png", "a\x00.png"):
        resp = await _v2_upload(client, file=file, file_path=name)
        assert resp.status == 422, (name[:20], await resp.text())
    for body, ctype in ((b"x", "multipart/form-data"), (b"--B\r\nbroken", "multipart/form-data; boundary=B")):
        resp = await client.post("/api/v2/assets", data=body, headers={"Content-Type": ctype})
        assert resp.status == 400, await resp.text()
    inputs = Path(engine.env.folders.input_dir)
    assert not [p for p in inputs.rglob("*") if p.name.endswith(".partial")]


async def test_idempotency_keys_outside_printable_ascii_are_400s(aiohttp_client: Any, engine: Any) -> None:
    """A key with bytes that are not UTF-8 reached SQLite as lone surrogates: a 500."""
    client: TestClient = await aiohttp_client(create_app(engine))
    port = client.server.port
    body = b'{"workflow": {"1": {"class_type": "StubSeed", "inputs": {"seed": 1}}}}'
    for key in (b"\xff\xfe", b"caf\xc3\xa9", b"a\x01b"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/v2/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: "
            + key
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        status = int((await reader.readline()).split()[1])
        writer.close()
        assert status == 400, key
    assert (
        await client.post("/api/v2/jobs", json={"workflow": txt2img()}, headers={"Idempotency-Key": "k-1"})
    ).status == 201


async def _raw_status(port: int, head: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Host: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


async def test_credentials_with_bytes_outside_utf8_are_401s(aiohttp_client: Any, tmp_path: Path) -> None:
    """They arrive as lone surrogates, which `str.encode` and base64 refused: 500s before any route."""
    engine = make_engine(tmp_path, auth_token="tok", api_auth="user:pw")
    client: TestClient = await aiohttp_client(create_app(engine))
    port = client.server.port
    assert port is not None
    for head in (
        b"GET /queue HTTP/1.1\r\nAuthorization: Bearer \xff\xfe\r\n",
        b"GET /queue HTTP/1.1\r\nCookie: nodegraph_token=\xff\r\n",
        b"GET /sdapi/v1/options HTTP/1.1\r\nAuthorization: Basic \xc3\xa9\xff\r\n",
        b"POST /prompt HTTP/1.1\r\nAuthorization: Bearer tok\xff\r\n",
    ):
        assert await _raw_status(port, head) == 401, head
    assert await _raw_status(port, b"GET /queue HTTP/1.1\r\nAuthorization: Bearer tok\r\n") == 200
    # a header kept with the prompt: only printable ASCII is kept (a lone surrogate went into the queue)
    body = json.dumps({"prompt": txt2img(delay=0.3)}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /prompt HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok\r\n"
        b"Comfy-Usage-Source: x\xff\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    assert int((await reader.readline()).split()[1]) == 200
    writer.close()
    for path in ("/queue", "/history"):
        text = await (await client.get(path, headers={"Authorization": "Bearer tok"})).text()
        assert "comfy_usage_source" not in text and "\\udcff" not in text, path


async def test_an_upload_cut_short_by_a_full_disk_leaves_no_file(
    aiohttp_client: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    real = Path.write_bytes

    def half(self: Path, data: Any) -> int:
        real(self, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half)
    form = FormData()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    form.add_field("image", buffer.getvalue(), filename="full.png", content_type="image/png")
    resp = await client.post("/upload/image", data=form)
    assert resp.status == 507
    assert list(Path(engine.env.folders.input_dir).rglob("*")) == []
