"""`--enable-cors-header ORIGIN` allows exactly that origin (D5); stored files never run as pages (D6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, WSServerHandshakeError
from aiohttp.test_utils import TestClient

from nodegraph.server import create_app
from tests.server.stubs import make_engine, txt2img

pytestmark = pytest.mark.asyncio
TRUSTED, EVIL = "http://trusted.example", "http://evil.example"


async def test_cors_allows_only_the_configured_origin(aiohttp_client: Any, tmp_path: Path) -> None:
    engine = make_engine(tmp_path, enable_cors_header=TRUSTED)
    client: TestClient = await aiohttp_client(create_app(engine))
    plain = {"Content-Type": "text/plain"}
    evil = await client.post("/prompt", json={"prompt": txt2img()}, headers={"Origin": EVIL, **plain})
    assert evil.status == 403 and "Access-Control-Allow-Origin" not in evil.headers
    assert (await client.post("/userdata/x.txt", data=b"x", headers={"Origin": EVIL})).status == 403
    with pytest.raises(WSServerHandshakeError):
        await client.ws_connect("/ws", headers={"Origin": EVIL})
    good = await client.post("/prompt", json={"prompt": txt2img()}, headers={"Origin": TRUSTED})
    assert good.status == 200 and good.headers["Access-Control-Allow-Origin"] == TRUSTED
    same = await client.post("/interrupt", headers={"Origin": f"http://{client.host}:{client.port}"})
    assert same.status == 200


async def test_preflight_from_the_allowed_origin_is_answered_before_the_token(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    engine = make_engine(tmp_path, listen="0.0.0.0", auth_token="sekrit", enable_cors_header=TRUSTED)
    client: TestClient = await aiohttp_client(create_app(engine))
    ask = {"Origin": TRUSTED, "Access-Control-Request-Method": "POST"}
    pre = await client.options("/prompt", headers=ask)
    assert pre.status == 200 and pre.headers["Access-Control-Allow-Origin"] == TRUSTED
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    evil_pre = await client.options("/prompt", headers={**ask, "Origin": EVIL})
    assert evil_pre.status == 401 and "Access-Control-Allow-Origin" not in evil_pre.headers
    auth = {"Origin": TRUSTED, "Authorization": "Bearer sekrit"}
    assert (await client.post("/interrupt", headers=auth)).status == 200
    assert (await client.post("/interrupt", headers={"Origin": TRUSTED})).status == 401
    ws = await client.ws_connect("/ws", headers=auth)
    await ws.close()


ACTIVE = ["x.svg", "x.svgz", "x.xhtml", "x.xht", "x.xml", "x.xsl", "x.html", "x.htm", "x.js", "x.pdf"]


@pytest.mark.parametrize("name", ACTIVE)
async def test_script_capable_files_are_never_served_inline(
    aiohttp_client: Any, engine: Any, name: str
) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    payload = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
    form = FormData()
    form.add_field("image", payload, filename=name, content_type="image/svg+xml")
    stored = await (await client.post("/upload/image", data=form)).json()
    assert (await client.post(f"/userdata/{name}", data=payload)).status == 200
    for url in (f"/view?filename={stored['name']}&type=input", f"/userdata/{name}"):
        resp = await client.get(url)
        assert resp.status == 200, url
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Disposition"].startswith("attachment"), url
        kind = resp.headers["Content-Type"]
        assert not any(w in kind for w in ("html", "xml", "svg", "javascript")), (url, kind)


async def test_safe_types_stay_inline(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    assert (await client.post("/userdata/w.json", data=b"{}")).status == 200
    resp = await client.get("/userdata/w.json")
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["Content-Disposition"].startswith("inline")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
