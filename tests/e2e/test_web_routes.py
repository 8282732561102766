"""The canvas's HTTP side without a browser: LoRA metadata routes and the frontend's static routes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors.numpy
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.server import frontend, routes_lora
from nodes import demo, register_services

WEB = Path(__file__).resolve().parents[2] / "web"


@pytest.fixture
def lora_env(tmp_path: Path, mini_loras: Path) -> Environment:
    """LoRAs: a (trigger phrase, preview), b (tag frequency), c (CivitAI sidecar), d (not a LoRA)."""
    folders = Folders.at(tmp_path)
    loras = tmp_path / "models" / "loras"
    (loras / "sub").mkdir(parents=True)
    tensors = safetensors.numpy.load_file(str(mini_loras / "mini_lora_a.safetensors"))
    safetensors.numpy.save_file(
        tensors,
        str(loras / "a.safetensors"),
        metadata={"modelspec.trigger_phrase": "cattail style, red chair"},
    )
    Image.new("RGB", (8, 8), (0, 0, 255)).save(loras / "a.preview.png")
    tags = json.dumps({"10_set": {"glass": 2, "bottle": 9}, "other": {"bottle": 1, "galaxy": 5}})
    b = safetensors.numpy.load_file(str(mini_loras / "mini_lora_b.safetensors"))
    safetensors.numpy.save_file(b, str(loras / "sub" / "b.safetensors"), metadata={"ss_tag_frequency": tags})
    shutil.copy(mini_loras / "mini_lora_a.safetensors", loras / "c.safetensors")
    (loras / "c.civitai.info").write_text(json.dumps({"trainedWords": ["zxc person, smiling"]}))
    (loras / "d.safetensors").write_bytes(b"\xff" * 16)
    return Environment(folders)


async def _client(aiohttp_client, env: Environment) -> TestClient:  # type: ignore[no-untyped-def]
    register_services(env)
    app = web.Application()
    app[routes_lora.ENV] = env
    app.add_routes(routes_lora.routes)
    return await aiohttp_client(app)


@pytest.mark.asyncio
async def test_lora_list_reads_trigger_words_rank_and_base_model(aiohttp_client, lora_env) -> None:  # type: ignore[no-untyped-def]
    client = await _client(aiohttp_client, lora_env)
    listed = {i["name"]: i for i in await (await client.get("/nodegraph/loras")).json()}
    assert set(listed) == {"a.safetensors", "sub/b.safetensors", "c.safetensors", "d.safetensors"}
    assert listed["a.safetensors"]["trigger_words"] == ["cattail style", "red chair"]
    assert listed["a.safetensors"]["rank"] == 4 and listed["sub/b.safetensors"]["rank"] == 8
    assert listed["a.safetensors"]["base_model"] == "SD1.5"  # from the 768-wide cross-attention keys
    assert listed["sub/b.safetensors"]["trigger_words"][:2] == ["bottle", "galaxy"]  # summed over datasets
    assert listed["c.safetensors"]["trigger_words"] == ["zxc person, smiling"]  # one CivitAI entry, one chip
    assert listed["a.safetensors"]["preview_url"] == "/nodegraph/lora_preview?name=a.safetensors"
    assert listed["c.safetensors"]["preview_url"] is None
    assert "error" in listed["d.safetensors"] and listed["d.safetensors"]["trigger_words"] == []


@pytest.mark.asyncio
async def test_lora_info_and_preview_refuse_names_outside_the_folder(aiohttp_client, lora_env) -> None:  # type: ignore[no-untyped-def]
    client = await _client(aiohttp_client, lora_env)
    info = await client.get("/nodegraph/lora_info", params={"name": "sub/b.safetensors"})
    assert info.status == 200 and (await info.json())["rank"] == 8
    assert (await client.get("/nodegraph/lora_info")).status == 400
    assert (await client.get("/nodegraph/lora_info", params={"name": "../../etc/passwd"})).status == 403
    missing = await client.get("/nodegraph/lora_info", params={"name": "nope.safetensors"})
    assert missing.status == 404 and "nope.safetensors" in await missing.text()
    preview = await client.get("/nodegraph/lora_preview", params={"name": "a.safetensors"})
    assert preview.status == 200 and (await preview.read()).startswith(b"\x89PNG")
    assert (await client.get("/nodegraph/lora_preview", params={"name": "c.safetensors"})).status == 404
    assert (await client.get("/nodegraph/lora_preview", params={"name": "/etc/hostname"})).status == 403


@pytest.mark.asyncio
async def test_frontend_routes_serve_index_extensions_and_static_files(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    app = web.Application()
    frontend.add_frontend_routes(app, None)
    client = await aiohttp_client(app)
    index = await client.get("/")
    assert index.status == 200 and index.headers["Cache-Control"] == "no-cache"
    assert '<div id="vue-app"' in await index.text() or "vue-app" in await index.text()
    for url in frontend.extension_urls():
        reply = await client.get(url)
        assert reply.status == 200 and reply.headers["Cache-Control"] == "no-cache", url
    assert (await client.get("/extensions/nodegraph/default_workflow.json")).status == 200
    assert (await client.get("/extensions/nodegraph/..%2F..%2Fpyproject.toml")).status == 404
    assert (await client.get("/extensions/nodegraph/missing.js")).status == 404
    assert await (await client.get("/templates/index.json")).json() == []
    assert (await client.get("/scripts/app.js")).status == 200  # the frontend's shim our modules import


def test_settings_turn_off_first_start_dialogs_and_outside_calls() -> None:
    assert frontend.DEFAULT_SETTINGS["Comfy.TutorialCompleted"] is True
    assert frontend.DEFAULT_SETTINGS["Comfy.Notification.ShowVersionUpdates"] is False
    import comfyui_frontend_package

    assert frontend.DEFAULT_SETTINGS["Comfy.InstalledVersion"] == comfyui_frontend_package.__version__


def test_front_end_root_override_must_hold_an_index(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="front-end-root"):
        frontend.frontend_root(tmp_path)
    (tmp_path / "index.html").write_text("<html></html>")
    assert frontend.frontend_root(tmp_path) == tmp_path


def test_extension_modules_import_only_files_that_exist() -> None:
    for module in WEB.glob("*.js"):
        for target in re.findall(r'from "(\.[^"]+)"', module.read_text()):
            if target.startswith("./"):
                assert (WEB / target[2:]).is_file(), f"{module.name} imports missing {target}"
            else:  # ../../scripts/x.js resolves against /extensions/nodegraph/ to the frontend's /scripts/
                assert (frontend.frontend_root() / target.removeprefix("../../")).is_file(), target


def test_default_workflow_links_agree_with_both_ends() -> None:
    graph = json.loads((WEB / "default_workflow.json").read_text())
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert {"LoraLoader", "CheckpointLoaderSimple", "KSampler", "SaveImage"} <= {
        n["type"] for n in nodes.values()
    }
    for link_id, src, src_slot, dst, dst_slot, kind in graph["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == kind == nodes[dst]["inputs"][dst_slot]["type"]
    sampler = next(n for n in nodes.values() if n["type"] == "KSampler")
    model_link = next(link for link in graph["links"] if link[0] == sampler["inputs"][0]["link"])
    assert nodes[model_link[1]]["type"] == "LoraLoader"  # the sampler samples the LoRA-patched model
    assert graph["last_link_id"] == max(link[0] for link in graph["links"])
    assert graph["last_node_id"] == max(nodes)


def _names_in(graph: dict[str, object], node_type: str) -> list[object]:
    nodes = graph["nodes"]
    assert isinstance(nodes, list)
    return next(n["widgets_values"] for n in nodes if n["type"] == node_type)


def test_default_workflow_names_the_installed_models_and_sizes_for_the_demo(tmp_path: Path) -> None:
    env = Environment(Folders.at(tmp_path))
    ckpts, loras = tmp_path / "models" / "checkpoints", tmp_path / "models" / "loras"
    ckpts.mkdir(parents=True)
    loras.mkdir(parents=True)
    for name in (demo.CHECKPOINT_NAME, *demo.LORA_NAMES):
        (ckpts if "sd15" in name else loras).joinpath(name).write_bytes(b"")
    (loras / "a_style.safetensors").write_bytes(b"")
    on_demo = routes_lora.default_workflow(env)
    assert _names_in(on_demo, "CheckpointLoaderSimple") == [demo.CHECKPOINT_NAME]
    assert _names_in(on_demo, "LoraLoader")[0] == demo.LORA_NAMES[0]  # the demo's LoRA fits the demo model
    assert _names_in(on_demo, "EmptyLatentImage")[:2] == [128, 128] and _names_in(on_demo, "KSampler")[2] == 8

    (ckpts / "dreamshaper_8.safetensors").write_bytes(b"")  # a user's own model wins over the demo
    own = routes_lora.default_workflow(env)
    assert _names_in(own, "CheckpointLoaderSimple") == ["dreamshaper_8.safetensors"]
    assert _names_in(own, "LoraLoader")[0] == "a_style.safetensors"
    assert _names_in(own, "EmptyLatentImage")[:2] == [512, 512] and _names_in(own, "KSampler")[2] == 20


@pytest.mark.asyncio
async def test_frontend_text_files_go_out_gzipped_when_accepted(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    app = web.Application()
    frontend.add_frontend_routes(app, None)
    client = await aiohttp_client(app)
    original = (frontend.frontend_root() / "scripts" / "app.js").read_bytes()
    zipped = await client.get("/scripts/app.js", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["Content-Encoding"] == "gzip" and zipped.content_type == "text/javascript"
    assert await zipped.read() == original  # the client undoes the gzip
    plain = await client.get("/scripts/app.js", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers and await plain.read() == original
    assert (await client.get("/assets/../../__init__.py")).status == 404
    assert (await client.get("/%2e%2e/__init__.py")).status == 404
    assert (await client.get("/no/such/file.js")).status == 404


@pytest.mark.asyncio
async def test_the_lora_list_marks_which_loras_fit_the_connected_checkpoint(  # type: ignore[no-untyped-def]
    aiohttp_client, tmp_path: Path, mini_loras: Path, mini_checkpoint: Path, mini_sdxl_checkpoint: Path
) -> None:
    from nodes import demo_sdxl

    folders = Folders.at(tmp_path)
    ckpts, loras = folders.paths("checkpoints")[0], folders.paths("loras")[0]
    ckpts.mkdir(parents=True)
    (ckpts / "sd15.safetensors").symlink_to(mini_checkpoint)
    (ckpts / "xl.safetensors").symlink_to(mini_sdxl_checkpoint)
    loras.mkdir(parents=True)
    shutil.copy(mini_loras / "mini_lora_a.safetensors", loras / "sd15_lora.safetensors")
    demo_sdxl.write_sdxl_lora(loras / "xl_lora.safetensors", "b", 8, 4.0)
    client = await _client(aiohttp_client, Environment(folders))

    async def marks(query: str) -> dict[str, tuple[object, object]]:
        listed = await (await client.get(f"/nodegraph/loras{query}")).json()
        return {i["name"]: (i.get("fits"), i.get("checkpoint_family")) for i in listed}

    assert await marks("?checkpoint=xl.safetensors") == {
        "sd15_lora.safetensors": (False, "sdxl"),
        "xl_lora.safetensors": (True, "sdxl"),
    }
    assert await marks("?checkpoint=sd15.safetensors") == {
        "sd15_lora.safetensors": (True, "sd15"),
        "xl_lora.safetensors": (False, "sd15"),
    }
    unknown = await marks("?checkpoint=gone.safetensors")  # a stale name: nothing is marked
    assert set(unknown.values()) == {(None, "unknown")}
    assert set((await marks("")).values()) == {(None, None)}  # no checkpoint given: no marks at all


def test_default_workflow_on_an_sdxl_checkpoint_asks_for_1024_and_an_sdxl_lora(
    tmp_path: Path, mini_sdxl_checkpoint: Path, mini_sdxl_loras: Path
) -> None:
    env = Environment(Folders.at(tmp_path))
    register_services(env)  # the kinds and families come from the node layer's catalogs
    ckpts, loras = tmp_path / "models" / "checkpoints", tmp_path / "models" / "loras"
    ckpts.mkdir(parents=True)
    loras.mkdir(parents=True)
    (ckpts / "xl_base.safetensors").symlink_to(mini_sdxl_checkpoint)  # only the header is read
    (loras / "a_style.safetensors").write_bytes(b"")  # first by name, but no SDXL LoRA
    (loras / "xl_style.safetensors").symlink_to(mini_sdxl_loras / "mini_sdxl_lora.safetensors")
    graph = routes_lora.default_workflow(env)
    assert _names_in(graph, "CheckpointLoaderSimple") == ["xl_base.safetensors"]
    assert _names_in(graph, "LoraLoader")[0] == "xl_style.safetensors"
    assert _names_in(graph, "EmptyLatentImage")[:2] == [1024, 1024]
