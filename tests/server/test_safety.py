"""Safe by default: path escapes, access token, cross-site origin, size limits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, WSServerHandshakeError
from aiohttp.test_utils import TestClient
from yarl import URL

from nodegraph.server import create_app
from nodegraph.server.auth import effective_token, same_origin
from nodegraph.server.state import STATE
from tests.server.stubs import make_engine

pytestmark = pytest.mark.asyncio


def raw(path: str) -> URL:
    """A URL sent exactly as written: no client-side normalisation of `..` or `%2e`."""
    return URL(path, encoded=True)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    outside = tmp_path / "secret.txt"
    outside.write_text("do not serve")
    return outside


VIEW_ESCAPES = [
    ("/view?filename=../secret.txt&type=output", 400),
    ("/view?filename=%2e%2e%2fsecret.txt&type=output", 400),
    ("/view?filename=%2E%2E/secret.txt", 400),
    ("/view?filename=/etc/passwd", 400),
    ("/view?filename=..%5csecret.txt", 400),
    ("/view?filename=a.png%00.txt", 400),
    ("/view?filename=secret.txt&subfolder=..", 403),
    ("/view?filename=secret.txt&subfolder=%2e%2e", 403),
    ("/view?filename=secret.txt&subfolder=/tmp", 403),
    ("/view?filename=passwd&subfolder=../../../../etc", 403),
    ("/view?filename=secret.txt&type=models", 400),
    ("/view?filename=secret.txt&type=..", 400),
]


@pytest.mark.parametrize(("path", "status"), VIEW_ESCAPES)
async def test_view_refuses_escapes(
    aiohttp_client: Any, engine: Any, secret: Path, path: str, status: int
) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    resp = await client.get(raw(path))
    assert resp.status == status, await resp.text()
    assert "do not serve" not in await resp.text()


async def test_view_refuses_symlinks_out_of_output(aiohttp_client: Any, engine: Any, secret: Path) -> None:
    output = Path(engine.env.folders.output_dir)
    os.symlink(secret, output / "link.png")
    os.symlink(secret.parent, output / "linkdir")
    client: TestClient = await aiohttp_client(create_app(engine))
    assert (await client.get("/view?filename=link.png")).status == 403
    assert (await client.get("/view?filename=secret.txt&subfolder=linkdir")).status == 403


MULTIPART = {"Content-Type": "multipart/form-data; boundary=XyZ"}


def multipart(filename: str, subfolder: str) -> bytes:
    """What a browser sends: the file name raw in Content-Disposition (aiohttp's client %-encodes it)."""
    quoted = filename.replace("\\", "\\\\")
    return (
        f'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="{quoted}"\r\n'
        "Content-Type: image/png\r\n\r\nfake\r\n"
        f'--XyZ\r\nContent-Disposition: form-data; name="subfolder"\r\n\r\n{subfolder}\r\n--XyZ--\r\n'
    ).encode()


@pytest.mark.parametrize(
    ("filename", "subfolder"),
    [
        ("../evil.png", ""),
        ("..\\evil.png", ""),
        ("/tmp/evil.png", ""),
        ("ok.png", "../.."),
        ("ok.png", "/tmp"),
        ("ok.png", "a/../../.."),
    ],
)
async def test_upload_refuses_escapes(
    aiohttp_client: Any, engine: Any, filename: str, subfolder: str
) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    resp = await client.post("/upload/image", data=multipart(filename, subfolder), headers=MULTIPART)
    assert resp.status == 400, await resp.text()
    assert not (Path(engine.env.folders.base_dir).parent / "evil.png").exists()


@pytest.mark.parametrize(
    "path",
    [
        "/userdata/..%2Fsecret.txt",
        "/userdata/%2e%2e%2fsecret.txt",
        "/userdata/%2Ftmp%2Fx",
        "/userdata/a%00b",
        "/userdata/..%5C..%5Csecret.txt",
    ],
)
async def test_userdata_refuses_escapes(
    aiohttp_client: Any, engine: Any, secret: Path, tmp_path: Path, path: str
) -> None:
    # the user root is user/default: one `..` lands in user/, two in the base directory
    near = tmp_path / "user" / "secret.txt"
    near.parent.mkdir(parents=True, exist_ok=True)
    near.write_text("do not serve")
    client: TestClient = await aiohttp_client(create_app(engine))
    got = await client.get(raw(path))
    assert got.status in (400, 403, 404) and "do not serve" not in await got.text()
    posted = await client.post(raw(path), data=b"overwritten")
    assert posted.status in (400, 403, 404)
    assert secret.read_text() == "do not serve" and near.read_text() == "do not serve"
    listing = await client.get(raw("/userdata?dir=..%2F.."))
    assert listing.status in (403, 404)


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_token_needed_only_off_loopback() -> None:
    assert effective_token("127.0.0.1", None) is None
    assert effective_token("::1,localhost", None) is None
    assert effective_token("0.0.0.0", None)
    assert effective_token("192.168.1.5", None)
    assert effective_token("127.0.0.1", "given") == "given"


async def test_non_loopback_requires_the_token(aiohttp_client: Any, tmp_path: Path) -> None:
    app = create_app(make_engine(tmp_path, listen="0.0.0.0"))
    token = app[STATE].token
    assert token
    client: TestClient = await aiohttp_client(app)
    assert (await client.get("/system_stats")).status == 401
    assert (await client.get("/object_info", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/system_stats", headers={"Authorization": f"Bearer {token}"})).status == 200
    with pytest.raises(WSServerHandshakeError):
        await client.ws_connect("/ws?clientId=x")
    ws = await client.ws_connect(f"/ws?clientId=x&token={token}")
    await ws.close()
    # Visiting once with ?token= leaves a cookie the browser canvas then sends on every request.
    first = await client.get(f"/settings?token={token}")
    assert first.status == 200 and "nodegraph_token" in first.cookies
    assert (await client.get("/settings")).status == 200


async def test_explicit_token_on_loopback_is_required(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path, auth_token="s3cret")))
    assert (await client.post("/prompt", json={"prompt": {}})).status == 401
    assert (await client.get("/queue?token=s3cret")).status == 200


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "null", "http://127.0.0.1:1", "https://localhost.evil"]
)
async def test_cross_site_state_changes_are_refused(aiohttp_client: Any, engine: Any, origin: str) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    for path in ("/prompt", "/interrupt", "/queue", "/settings/x", "/free"):
        resp = await client.post(path, json={}, headers={"Origin": origin})
        assert resp.status == 403, path
    with pytest.raises(WSServerHandshakeError):
        await client.ws_connect("/ws", headers={"Origin": origin})
    assert (
        await client.get("/queue", headers={"Origin": origin})
    ).status == 200  # reads are not state changes


async def test_same_origin_and_scripts_without_origin_are_allowed(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    host = f"{client.server.host}:{client.server.port}"
    assert (await client.post("/interrupt", headers={"Origin": f"http://{host}"})).status == 200
    assert (await client.post("/interrupt")).status == 200
    ws = await client.ws_connect("/ws", headers={"Origin": f"http://{host}"})
    await ws.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_same_origin_compares_host_and_port() -> None:
    assert same_origin("http://127.0.0.1:8188", "127.0.0.1:8188", "http")
    assert same_origin("http://example.com", "example.com:80", "http")
    assert not same_origin("http://127.0.0.1:8189", "127.0.0.1:8188", "http")
    assert not same_origin("http://localhost:8188", "127.0.0.1:8188", "http")
    assert not same_origin("null", "127.0.0.1:8188", "http")


async def test_request_size_limits(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path), max_upload_size=1000))
    form = FormData()
    form.add_field("image", b"x" * 5000, filename="big.png", content_type="image/png")
    assert (await client.post("/upload/image", data=form)).status == 413
    assert not (tmp_path / "input" / "big.png").exists()
    assert (await client.post("/userdata/big.json", data=b"x" * 5000)).status == 413
    big_prompt = {"prompt": {"1": {"class_type": "StubFail", "inputs": {"message": "x" * 5000}}}}
    resp = await client.post("/prompt", json=big_prompt)
    assert resp.status == 413 and (await resp.json())["error"]["type"] == "request_too_large"


@pytest.mark.parametrize(
    "name",
    ["../../secret.safetensors", "/etc/x.safetensors", "..%2F..%2Fsecret.safetensors", "a%00.safetensors"],
)
async def test_model_names_stay_in_their_folder(
    aiohttp_client: Any, engine: Any, tmp_path: Path, name: str
) -> None:
    # a readable safetensors header two levels above models/checkpoints: an escape would serve it
    header = b'{"__metadata__":{"k":"leaked"}}'
    (tmp_path / "secret.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (tmp_path / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    client: TestClient = await aiohttp_client(create_app(engine))
    resp = await client.get(raw(f"/view_metadata/checkpoints?filename={name}"))
    assert resp.status in (400, 403, 404) and "leaked" not in await resp.text()


async def test_cors_option_answers_cross_origin_requests(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path, enable_cors_header="*")))
    resp = await client.post("/interrupt", headers={"Origin": "http://elsewhere.example"})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
    pre = await client.options(
        "/prompt", headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    )
    assert pre.status == 200 and "POST" in pre.headers["Access-Control-Allow-Methods"]


async def test_dns_rebinding_host_is_refused_on_loopback(aiohttp_client: Any, engine: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    rebound = {"Host": "evil.example:8188", "Origin": "http://evil.example:8188"}
    assert (await client.get("/history", headers=rebound)).status == 403
    assert (await client.post("/prompt", json={}, headers=rebound)).status == 403
    for host in ("localhost:8188", "127.0.0.1", "[::1]:8188"):
        assert (await client.get("/queue", headers={"Host": host})).status == 200, host


@pytest.mark.parametrize("value", ["/etc/passwd", "secret.txt", '{"1": {}}', ["1", 0], 5])
async def test_prompt_must_be_an_object_never_a_path(aiohttp_client: Any, engine: Any, value: Any) -> None:
    client: TestClient = await aiohttp_client(create_app(engine))
    resp = await client.post("/prompt", json={"prompt": value})
    assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_prompt"


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")
def test_serve_prints_the_token_and_listens_where_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiohttp import web

    from nodegraph import server

    seen: dict[str, Any] = {}

    def run_app(app: Any, **kw: Any) -> None:
        seen.update(kw, app=app)
        kw["print"]("======== Running on ...")  # aiohttp's call once the sockets listen

    monkeypatch.setattr(web, "run_app", run_app)
    server.serve(make_engine(tmp_path, listen="0.0.0.0,::"))
    out = capsys.readouterr().out
    token = seen["app"][STATE].token
    assert token and f"access token: {token}" in out and f"Bearer {token}" in out
    assert seen["host"] == ["0.0.0.0", "::"] and seen["port"] == 0
    server.serve(make_engine(tmp_path / "b"))
    assert "access token" not in capsys.readouterr().out and seen["host"] == ["127.0.0.1"]
