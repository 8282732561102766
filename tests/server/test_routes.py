"""The non-prompt routes: /view, uploads, settings, userdata, object_info, models, system_stats, /free."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from PIL import Image, PngImagePlugin

from nodegraph.folders import PathEscapeError
from nodegraph.server import create_app
from nodegraph.server.frontend import DEFAULT_SETTINGS, extension_urls
from nodegraph.services import DeviceInfo, LoraCatalog
from tests.server.stubs import RUNS, txt2img

pytestmark = pytest.mark.asyncio


def png(color: tuple[int, ...], mode: str = "RGBA", text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    out = io.BytesIO()
    Image.new(mode, (4, 4), color).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


async def _client(aiohttp_client: Any, engine: Any) -> TestClient:
    return await aiohttp_client(create_app(engine))


async def test_view_serves_and_reencodes(aiohttp_client: Any, engine: Any) -> None:
    output = Path(engine.env.folders.output_dir)
    (output / "sub").mkdir()
    (output / "sub" / "a.png").write_bytes(png((10, 20, 30, 40)))
    (output / "page.html").write_text("<script>alert(1)</script>")
    client = await _client(aiohttp_client, engine)
    plain = await client.get("/view?filename=a.png&subfolder=sub&type=output")
    assert plain.status == 200 and plain.headers["Content-Type"] == "image/png"
    assert plain.headers["Content-Disposition"].startswith('inline; filename="a.png"')
    assert plain.headers["X-Content-Type-Options"] == "nosniff"
    assert await plain.read() == (output / "sub" / "a.png").read_bytes()
    annotated = await client.get(
        "/view", params={"filename": "a.png [output]", "subfolder": "sub", "type": "input"}
    )
    assert annotated.status == 200
    webp = await client.get("/view?filename=a.png&subfolder=sub&preview=webp;90")
    assert webp.headers["Content-Type"] == "image/webp" and (await webp.read())[8:12] == b"WEBP"
    jpeg = await client.get("/view?filename=a.png&subfolder=sub&preview=jpeg;50")
    assert (await jpeg.read())[:2] == b"\xff\xd8"
    rgb = Image.open(
        io.BytesIO(await (await client.get("/view?filename=a.png&subfolder=sub&channel=rgb")).read())
    )
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (10, 20, 30)
    alpha = Image.open(
        io.BytesIO(await (await client.get("/view?filename=a.png&subfolder=sub&channel=a")).read())
    )
    assert alpha.mode == "RGBA" and alpha.getpixel((0, 0))[3] == 40
    html = await client.get("/view?filename=page.html")
    assert html.headers["Content-Type"] == "application/octet-stream"
    assert (await client.get("/view?filename=missing.png")).status == 404


async def test_upload_image_names_and_overwrite(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)

    async def upload(data: bytes, **fields: str) -> dict[str, Any]:
        form = FormData()
        form.add_field("image", data, filename="pic.png", content_type="image/png")
        for key, value in fields.items():
            form.add_field(key, value)
        resp = await client.post("/upload/image", data=form)
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())

    red, blue = png((255, 0, 0, 255)), png((0, 0, 255, 255))
    assert await upload(red) == {"name": "pic.png", "subfolder": "", "type": "input"}
    assert (await upload(red))["name"] == "pic.png"  # same bytes: the existing file is reused
    assert (await upload(blue))["name"] == "pic (1).png"
    assert (await upload(blue, overwrite="true"))["name"] == "pic.png"
    assert (Path(engine.env.folders.input_dir) / "pic.png").read_bytes() == blue
    assert await upload(red, subfolder="masks", type="temp") == {
        "name": "pic.png",
        "subfolder": "masks",
        "type": "temp",
    }
    assert (Path(engine.env.folders.temp_dir) / "masks" / "pic.png").read_bytes() == red
    form = FormData()
    form.add_field("overwrite", "true")
    assert (await client.post("/upload/image", data=form)).status == 400


async def test_upload_mask_puts_alpha_on_the_original(aiohttp_client: Any, engine: Any) -> None:
    (Path(engine.env.folders.input_dir) / "orig.png").write_bytes(png((1, 2, 3), "RGB", {"prompt": "{}"}))
    client = await _client(aiohttp_client, engine)
    form = FormData()
    form.add_field("image", png((0, 0, 0, 77)), filename="orig_mask.png", content_type="image/png")
    form.add_field("original_ref", '{"filename": "orig.png", "type": "input", "subfolder": ""}')
    resp = await client.post("/upload/mask", data=form)
    assert resp.status == 200 and (await resp.json())["name"] == "orig_mask.png"
    merged = Image.open(Path(engine.env.folders.input_dir) / "orig_mask.png")
    assert merged.getpixel((0, 0)) == (1, 2, 3, 77) and merged.text["prompt"] == "{}"
    form = FormData()
    form.add_field("image", png((0, 0, 0, 77)), filename="m.png", content_type="image/png")
    form.add_field("original_ref", '{"filename": "../x.png"}')
    assert (await client.post("/upload/mask", data=form)).status == 400


async def test_settings_merge_over_canvas_defaults(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    defaults = dict(DEFAULT_SETTINGS)
    assert defaults["Comfy.TutorialCompleted"] is True  # the defaults exist: the test would notice them gone
    assert await (await client.get("/settings")).json() == defaults
    assert (await client.post("/settings/Comfy.X", json=5)).status == 200
    assert await (await client.get("/settings/Comfy.X")).json() == 5
    assert await (await client.get("/settings/absent")).json() is None
    await client.post("/settings", json={"Comfy.Y": "y"})
    assert await (await client.get("/settings")).json() == {**defaults, "Comfy.X": 5, "Comfy.Y": "y"}
    stored = Path(engine.env.folders.user_dir) / "default" / "comfy.settings.json"
    assert '"Comfy.X": 5' in stored.read_text()


async def test_userdata_write_list_read_move_delete(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    resp = await client.post("/userdata/workflows%2Fa.json", data=b'{"a": 1}')
    assert resp.status == 200 and await resp.json() == "workflows/a.json"
    assert (await client.post("/userdata/workflows%2Fa.json?overwrite=false", data=b"{}")).status == 409
    assert await (await client.get("/userdata?dir=workflows")).json() == ["a.json"]
    full = await (await client.get("/userdata?dir=workflows&recurse=true&full_info=true")).json()
    assert full[0]["path"] == "a.json" and full[0]["size"] == 8
    assert await (await client.get("/userdata?dir=workflows&split=true")).json() == [["a.json", "a.json"]]
    assert await (await client.get("/userdata/workflows%2Fa.json")).read() == b'{"a": 1}'
    moved = await client.post("/userdata/workflows%2Fa.json/move/workflows%2Fb.json")
    assert await moved.json() == "workflows/b.json"
    v2 = await (await client.get("/v2/userdata?path=workflows")).json()
    assert [(e["name"], e["type"]) for e in v2] == [("b.json", "file")]
    assert (await client.delete("/userdata/workflows%2Fb.json")).status == 204
    assert (await client.get("/userdata/workflows%2Fb.json")).status == 404
    assert (await client.get("/userdata?dir=nothing")).status == 404


async def test_object_info_models_embeddings(aiohttp_client: Any, engine: Any) -> None:
    models = Path(engine.env.folders.base_dir) / "models"
    (models / "checkpoints" / "sd").mkdir(parents=True)
    (models / "checkpoints" / "sd" / "m.safetensors").write_bytes(b"x")
    (models / "embeddings").mkdir(parents=True)
    (models / "embeddings" / "easy.pt").write_bytes(b"x")
    client = await _client(aiohttp_client, engine)
    info = await (await client.get("/object_info")).json()
    assert set(info) == {"StubSeed", "StubSampler", "StubSave", "StubFail"}
    one = await (await client.get("/object_info/StubSampler")).json()
    assert one["StubSampler"]["input"]["required"]["steps"][0] == "INT"
    assert await (await client.get("/object_info/Nope")).json() == {}
    assert "checkpoints" in await (await client.get("/models")).json()
    assert await (await client.get("/models/checkpoints")).json() == ["sd/m.safetensors"]
    assert (await client.get("/models/nope")).status == 404
    assert await (await client.get("/embeddings")).json() == ["easy"]


async def test_system_stats_features_extensions(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    stats = await (await client.get("/system_stats")).json()
    for key in (
        "os",
        "ram_total",
        "ram_free",
        "comfyui_version",
        "python_version",
        "pytorch_version",
        "argv",
    ):
        assert key in stats["system"], key
    assert stats["system"]["ram_total"] > 0 and stats["devices"][0]["type"]
    features = await (await client.get("/features")).json()
    assert features["supports_preview_metadata"] is True
    assert features["max_upload_size"] == 100 * 1024 * 1024
    urls = extension_urls()
    assert await (await client.get("/extensions")).json() == list(urls)
    assert await (await client.get("/users")).json() == {"storage": "server", "migrated": True}


async def test_system_stats_argv_hides_secrets(
    aiohttp_client: Any, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComfyUI shows the command line; a token given on it must not be readable over HTTP."""
    argv = [
        "nodegraph", "serve", "--listen", "0.0.0.0", "--auth-token", "tok-SECRET1", "--api-auth=u:SECRET2",
        "--api-key", "SECRET3", "--hf_token=SECRET4", "--tokenizer-dir", "clip", "--verbose",
        "--extra-model-paths", "https://me:SECRET5@models.example/x",
    ]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    client = await _client(aiohttp_client, engine)
    text = await (await client.get("/system_stats")).text()
    assert "SECRET" not in text
    shown = (await (await client.get("/api/system_stats")).json())["system"]["argv"]
    assert shown == [
        "nodegraph", "serve", "--listen", "0.0.0.0", "--auth-token", "<redacted>", "--api-auth=<redacted>",
        "--api-key", "<redacted>", "--hf_token=<redacted>", "--tokenizer-dir", "clip", "--verbose",
        "--extra-model-paths", "https://me:<redacted>@models.example/x",
    ]  # fmt: skip


async def test_free_drops_cached_outputs(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    await client.post("/prompt?wait=1", json={"prompt": txt2img()})
    assert (await client.post("/free", json={"unload_models": True, "free_memory": True})).status == 200
    await client.post("/prompt?wait=1", json={"prompt": txt2img()})
    assert RUNS == {"StubSeed": 2, "StubSampler": 2, "StubSave": 2}
    await client.post("/prompt?wait=1", json={"prompt": txt2img()})
    assert RUNS == {"StubSeed": 2, "StubSampler": 2, "StubSave": 2}


async def test_view_metadata_reads_the_safetensors_header(aiohttp_client: Any, engine: Any) -> None:
    folder = Path(engine.env.folders.base_dir) / "models" / "loras"
    folder.mkdir(parents=True)
    header = b'{"__metadata__": {"ss_network_dim": "4"}}'
    (folder / "l.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    client = await _client(aiohttp_client, engine)
    meta = await client.get("/view_metadata/loras?filename=l.safetensors")
    assert await meta.json() == {"ss_network_dim": "4"}
    assert (await client.get("/view_metadata/loras?filename=missing.safetensors")).status == 404


class OneGpu:
    def describe(self) -> dict[str, Any]:
        return {"name": "cuda:0 Test GPU", "type": "cuda", "index": 0, "vram_total": 8, "vram_free": 4}


async def test_system_stats_reports_the_device_service(aiohttp_client: Any, engine: Any) -> None:
    client = await _client(aiohttp_client, engine)
    assert (await (await client.get("/system_stats")).json())["devices"][0][
        "type"
    ] == "cpu"  # none registered
    engine.env.services[DeviceInfo] = OneGpu()
    assert (await (await client.get("/system_stats")).json())["devices"] == [OneGpu().describe()]


class SlowCatalog:
    """A `LoraCatalog` whose listing blocks like reading the headers of many LoRA files."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def list(self, checkpoint: str | None = None) -> list[dict[str, Any]]:
        time.sleep(self.seconds)  # blocking file reads, as FolderLoraCatalog does
        return [{"name": "a.safetensors"}]

    def describe(self, name: str) -> dict[str, Any]:
        if name.startswith(".."):
            raise PathEscapeError(name)
        return {"name": name}

    def preview(self, name: str) -> Path | None:
        return None


async def test_lora_routes_are_served_under_both_prefixes_from_the_catalog(
    aiohttp_client: Any, engine: Any
) -> None:
    client = await _client(aiohttp_client, engine)
    assert (await client.get("/nodegraph/loras")).status == 404  # no catalog registered: said so
    engine.env.services[LoraCatalog] = SlowCatalog(0.0)
    assert await (await client.get("/nodegraph/loras")).json() == [{"name": "a.safetensors"}]
    assert await (await client.get("/api/nodegraph/lora_info?name=b")).json() == {"name": "b"}
    assert (await client.get("/nodegraph/lora_info?name=../x")).status == 403
    assert (await client.get("/nodegraph/lora_info")).status == 400
    assert (await client.get("/nodegraph/lora_preview?name=b")).status == 404


async def test_a_slow_lora_listing_does_not_stall_the_event_loop(aiohttp_client: Any, engine: Any) -> None:
    """While /nodegraph/loras reads for 1.5 s, the loop keeps answering (websocket progress goes
    out the same way): a request made meanwhile returns long before the listing does."""
    engine.env.services[LoraCatalog] = SlowCatalog(1.5)
    client = await _client(aiohttp_client, engine)
    started = time.monotonic()
    listing = asyncio.ensure_future(client.get("/nodegraph/loras"))
    await asyncio.sleep(0.2)  # the listing is now inside its blocking read
    assert not listing.done()
    assert (await client.get("/queue")).status == 200
    answered = time.monotonic() - started
    assert not listing.done() and answered < 1.5
    assert (await listing).status == 200


async def test_engine_warm_up_runs_before_the_first_request(aiohttp_client: Any, engine: Any) -> None:
    import threading

    calls: list[str] = []
    engine.warm_up = lambda: calls.append(threading.current_thread().name)
    client = await _client(aiohttp_client, engine)
    assert len(calls) == 1 and calls[0] != threading.main_thread().name  # on a thread, not the loop
    assert (await client.get("/prompt")).status == 200
