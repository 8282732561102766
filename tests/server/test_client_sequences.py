"""SillyTavern's and Open WebUI's request sequences, replayed from their sources against a real server
on the mini SD1.5 checkpoint: the same paths, methods, headers and JSON bodies (defaults included), and
assertions on the response fields each client's code reads.

Sources (public repositories; the functions named are the ones replayed):

* SillyTavern/SillyTavern @ ba6f7b7a98cf7a5eaf4f0e81da9779a9a668ced4 (2024-09-28):
  `src/endpoints/stable-diffusion.js` (A1111 router: `/ping`, `/upscalers`, `/vaes`, `/samplers`,
  `/schedulers`, `/models`, `/get-model`, `/set-model`, `/generate`; `comfy` router: `/ping`,
  `/samplers`, `/schedulers`, `/vaes`, `/models`, `/generate`), `src/util.js` (`getBasicAuthHeader`),
  `public/scripts/extensions/stable-diffusion/index.js` (`defaultSettings`, `generateAutoImage`,
  `generateComfyImage`), `default/content/Default_Comfy_Workflow.json` (its placeholders).
* SillyTavern/SillyTavern @ 02903fdd3ad33dc642fb328e43d0a8b3724e1a38, `src/endpoints/stable-diffusion.js`
  (newer): `/vaes` asks `/sdapi/v1/sd-vae` and Forge's `/sdapi/v1/sd-modules` together and takes the first
  that answers; `/generate` first GETs `/sdapi/v1/options` and drops
  `override_settings.forge_additional_modules` unless the options have `forge_preset`.
* open-webui/open-webui @ 02530d501461ce58ab06231d7c2ef2024a141ddf: `backend/open_webui/routers/images.py`
  (engine `automatic1111`: `verify_url`, `get_models`, `get_image_model`, `set_image_model`,
  `image_generations`) and `backend/open_webui/utils/images/comfyui.py` (engine `comfyui`:
  `comfyui_create_image`, `comfyui_edit_image`, `comfyui_upload_image`, `queue_prompt`,
  `_ws_get_images`, `get_history`, `get_image_url`; `image_edits` keeps the `type=output` URLs).

`comfy` `/models` (SillyTavern's ComfyUI model list) reads `object_info.CheckpointLoaderSimple` and
`object_info.UNETLoader.input.required.unet_name` (and `UnetLoaderGGUF` when present): replayed with a
file in models/diffusion_models.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

import nodes
from nodegraph.engine import Settings, build_engine
from nodegraph.server.a1111 import parse_infotext, sampler_and_scheduler
from tests.server.live import LiveServer

pytestmark = pytest.mark.slow

AUTH = "tavern:secret"  # the "user:password" both clients keep and send as HTTP Basic
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_checkpoint_seed1: Path
) -> Iterator[LiveServer]:
    """`nodegraph serve --api-auth tavern:secret` over two checkpoints and a VAE file."""
    base = tmp_path_factory.mktemp("clients")
    for folder in ("checkpoints", "vae", "diffusion_models"):
        (base / "models" / folder).mkdir(parents=True)
    os.symlink(mini_checkpoint, base / "models" / "checkpoints" / "mini.safetensors")
    os.symlink(mini_checkpoint_seed1, base / "models" / "checkpoints" / "other.safetensors")
    os.symlink(mini_checkpoint, base / "models" / "vae" / "mini_vae.safetensors")  # a VAE file in LDM layout
    # UNETLoader reads a full checkpoint's UNet, as ComfyUI's does: listed as a diffusion model
    os.symlink(mini_checkpoint, base / "models" / "diffusion_models" / "mini_unet.safetensors")
    engine = build_engine(
        Settings(base_directory=base, port=0, api_auth=AUTH),
        nodes.all_nodes(),
        services=nodes.register_services,
        warm_up=nodes.warm_up,
    )
    engine.warm_up()
    with LiveServer(engine) as live:
        yield live


# ------------------------------------------------------------------ SillyTavern (node-fetch)


def basic(auth: str) -> str:
    """SillyTavern's `getBasicAuthHeader(auth)`: `Basic ${base64(auth)}`, sent even when auth is empty."""
    return "Basic " + base64.b64encode(auth.encode()).decode()


def st_fetch(server: LiveServer, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """node-fetch as SillyTavern calls it: GET with only the given headers, or POST of
    `JSON.stringify(body)` (compact JSON); raises like its `if (!result.ok) throw`."""
    data = (
        None if body is None else (body if isinstance(body, str) else json.dumps(body, separators=(",", ":")))
    )
    request = urllib.request.Request(
        f"http://{server.address}{path}", data=None if data is None else data.encode(), headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        raw = response.read()
    return raw


def st_json(
    server: LiveServer, path: str, body: Any = None, method_headers: dict[str, str] | None = None
) -> Any:
    return json.loads(st_fetch(server, path, body, method_headers))


def test_sillytavern_automatic1111_sequence(server: LiveServer) -> None:
    auth = {"Authorization": basic(AUTH)}
    post = {"Content-Type": "application/json", **auth}
    # /ping: GET options; only `result.ok` matters. Without the credentials A1111 --api-auth says 401.
    st_fetch(server, "/sdapi/v1/options", headers=auth)
    with pytest.raises(urllib.error.HTTPError) as refused:
        st_fetch(server, "/sdapi/v1/options", headers={"Authorization": basic("")})
    assert refused.value.code == 401

    # loadSettingOptions: samplers and schedulers are `data.map(x => x.name)`; each must come back.
    samplers = [x["name"] for x in st_json(server, "/sdapi/v1/samplers", method_headers=auth)]
    schedulers = [x["name"] for x in st_json(server, "/sdapi/v1/schedulers", method_headers=auth)]
    assert "DDIM" in samplers and "normal" in schedulers  # defaultSettings.sampler / .scheduler
    for name in samplers:
        sampler_and_scheduler(name, "automatic")
    for name in schedulers:
        sampler_and_scheduler("Euler", name)

    # loadAutoModels: /get-model reads options.sd_model_checkpoint, /models maps sd-models to
    # {value: title}; the current model must be one of the values for the dropdown to select it.
    current = st_json(server, "/sdapi/v1/options", method_headers=auth)["sd_model_checkpoint"]
    titles = [x["title"] for x in st_json(server, "/sdapi/v1/sd-models", method_headers=auth)]
    assert current in titles and len(titles) == 2

    # /upscalers: upscaler names with the latent modes spliced in after index 0 ("None").
    upscalers = [x["name"] for x in st_json(server, "/sdapi/v1/upscalers", method_headers=auth)]
    latent = [x["name"] for x in st_json(server, "/sdapi/v1/latent-upscale-modes", method_headers=auth)]
    upscalers[1:1] = latent
    assert upscalers[0] == "None" and "Latent" in upscalers and "Lanczos" in upscalers

    # /vaes: sd-vae's model_name (newer SillyTavern also asks Forge's sd-modules; sd-vae answers).
    vaes = [x["model_name"] for x in st_json(server, "/sdapi/v1/sd-vae", method_headers=auth)]
    assert vaes == ["mini_vae.safetensors"]
    with pytest.raises(urllib.error.HTTPError):
        st_fetch(server, "/sdapi/v1/sd-modules", headers=auth)

    # /set-model: POST options {sd_model_checkpoint}, then poll progress until 0.0 and job_count 0.
    other = next(t for t in titles if t.startswith("other"))
    st_fetch(server, "/sdapi/v1/options", {"sd_model_checkpoint": other}, post)
    progress = st_json(server, "/sdapi/v1/progress", method_headers=auth)
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert st_json(server, "/sdapi/v1/options", method_headers=auth)["sd_model_checkpoint"] == other

    # /generate: options read first (no forge_preset: Forge fields are dropped), then txt2img with the
    # whole request body: url and auth included, defaultSettings for everything the user did not change
    # (here: 64x64, 2 steps, a VAE picked from the list, seed -1 -> undefined -> left out).
    assert "forge_preset" not in st_json(server, "/sdapi/v1/options", method_headers=auth)
    body = st_generate_body("a lighthouse", vae="mini_vae.safetensors")
    data = st_json(server, "/sdapi/v1/txt2img", body, post)
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))  # SillyTavern: data.images[0]
    assert image.size == (64, 64) and image.format == "PNG"
    fields = parse_infotext(image.info["parameters"])
    assert fields["Model"] == "other" and fields["VAE"] == "mini_vae.safetensors"
    assert fields["Sampler"] == "DDIM" and fields["Steps"] == "2" and fields["CFG scale"] == "7"
    saved = list((server.engine.env.folders.output_dir).glob("a1111_*.png"))  # save_images: true
    assert saved

    # The hires fix with an image upscaler from the list SillyTavern showed (decode, Lanczos, encode).
    body = st_generate_body("a lighthouse", enable_hr=True, hr_upscaler="Lanczos", hr_scale=1.5)
    data = st_json(server, "/sdapi/v1/txt2img", body, post)
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.size == (96, 96)
    assert parse_infotext(image.info["parameters"])["Hires upscaler"] == "Lanczos"

    # The socket closing early makes SillyTavern POST interrupt (no body, Basic only).
    st_fetch(server, "/sdapi/v1/interrupt", "", auth)
    st_fetch(server, "/sdapi/v1/options", {"sd_model_checkpoint": "mini.safetensors"}, post)


def st_generate_body(prompt: str, vae: str = "", **changed: Any) -> dict[str, Any]:
    """`generateAutoImage`'s body with SillyTavern's defaultSettings (64x64, 2 steps where it says
    512, 20), merged over `getSdRequestBody()` ({url, auth}); undefined values are left out."""
    settings: dict[str, Any] = {
        "sampler": "DDIM", "scheduler": "normal", "steps": 2, "scale": 7, "width": 64, "height": 64,
        "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2.0,
        "denoising_strength": 0.7, "hr_second_pass_steps": 0, "clip_skip": 1,
    }  # fmt: skip
    settings.update(changed)
    override: dict[str, Any] = {"CLIP_stop_at_last_layers": settings["clip_skip"]}
    if vae and vae not in ("N/A", "Automatic"):
        override["sd_vae"] = vae
    return {
        "url": "http://127.0.0.1:7860", "auth": AUTH, "prompt": prompt,
        "negative_prompt": "lowres, bad anatomy, blurry", "sampler_name": settings["sampler"],
        "scheduler": settings["scheduler"], "steps": settings["steps"], "cfg_scale": settings["scale"],
        "width": settings["width"], "height": settings["height"], "restore_faces": settings["restore_faces"],
        "enable_hr": settings["enable_hr"], "hr_upscaler": settings["hr_upscaler"],
        "hr_scale": settings["hr_scale"], "denoising_strength": settings["denoising_strength"],
        "hr_second_pass_steps": settings["hr_second_pass_steps"], "override_settings": override,
        "override_settings_restore_afterwards": True, "clip_skip": settings["clip_skip"],
        "save_images": True, "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False,
    }  # fmt: skip


# The placeholders of SillyTavern's Default_Comfy_Workflow.json, which it fills by string replacement.
ST_WORKFLOW = json.dumps({
    "3": {"class_type": "KSampler", "inputs": {
        "cfg": "%scale%", "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
        "positive": ["6", 0], "sampler_name": "%sampler%", "scheduler": "%scheduler%", "seed": "%seed%",
        "steps": "%steps%"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "%model%"}},
    "5": {"class_type": "EmptyLatentImage",
          "inputs": {"batch_size": 1, "height": "%height%", "width": "%width%"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "%prompt%"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "%negative_prompt%"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "SillyTavern", "images": ["8", 0]}},
}, indent=4)  # fmt: skip


def test_sillytavern_comfyui_sequence(server: LiveServer) -> None:
    st_fetch(server, "/system_stats")  # comfy /ping: only result.ok
    info = st_json(server, "/object_info")
    samplers = info["KSampler"]["input"]["required"]["sampler_name"][0]
    schedulers = info["KSampler"]["input"]["required"]["scheduler"][0]
    vaes = info["VAELoader"]["input"]["required"]["vae_name"][0]
    checkpoints = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "euler" in samplers and "normal" in schedulers and "mini_vae.safetensors" in vaes
    assert checkpoints == ["mini.safetensors", "other.safetensors"]
    # comfy /models: checkpoints, then "UNet: " diffusion models, then GGUF ones if that loader exists
    models = [{"value": it, "text": it} for it in checkpoints]
    models += [
        {"value": it, "text": f"UNet: {it}"} for it in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    ]
    gguf = info.get("UnetLoaderGGUF")
    models += [
        {"value": it, "text": f"GGUF: {it}"}
        for it in (gguf["input"]["required"]["unet_name"][0] if gguf else [])
    ]
    for it in models:  # it.text.replace(/\.[^.]*$/, '').replace(/_/g, ' ')
        it["text"] = re.sub(r"\.[^.]*$", "", it["text"]).replace("_", " ")
    assert models == [
        {"value": "mini.safetensors", "text": "mini"},
        {"value": "other.safetensors", "text": "other"},
        {"value": "mini_unet.safetensors", "text": "UNet: mini unet"},
    ]

    # generateComfyImage: replaceAll('"%ph%"', JSON.stringify(value)); the seed is
    # Math.round(Math.random() * Number.MAX_SAFE_INTEGER), so it can reach 2**53 - 1.
    values = {"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 2**53 - 1,
              "model": "mini.safetensors", "sampler": "euler", "scheduler": "normal", "steps": 2, "scale": 7,
              "width": 64, "height": 64}  # fmt: skip
    workflow = ST_WORKFLOW
    for key, value in values.items():
        workflow = workflow.replace(f'"%{key}%"', json.dumps(value))
    # comfy /generate: POST /prompt with the string body (node-fetch: text/plain) and no auth header.
    body = '{\n                "prompt": ' + workflow + "\n            }"
    reply = st_json(server, "/prompt", body, {"Content-Type": "text/plain;charset=UTF-8"})
    prompt_id = reply["prompt_id"]
    deadline = time.monotonic() + 600
    while True:  # GET /history (all of it) every 100 ms until the id is in it
        item = st_json(server, "/history").get(prompt_id)
        if item:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert item["status"]["status_str"] != "error"
    outputs = list(item["outputs"].values())
    img = [i for o in outputs for i in o.get("images", [])][0]
    data = st_fetch(
        server, f"/view?filename={img['filename']}&subfolder={img['subfolder']}&type={img['type']}"
    )
    assert data.startswith(PNG) and img["filename"].startswith("SillyTavern_")


# ------------------------------------------------------------------ Open WebUI (aiohttp)


def owui_auth(api_auth: str | None) -> str:
    """`get_automatic1111_api_auth`: '' when unset, else `Basic base64(user:password)`."""
    return "" if api_auth is None else "Basic " + base64.b64encode(api_auth.encode()).decode()


async def open_webui_automatic1111(base: str, model: str | None, prompt: str, n: int) -> dict[str, Any]:
    """verify_url, get_models, set_image_model (when `model`), get_image_model, image_generations."""
    auth = {"authorization": owui_auth(AUTH)}
    seen: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        async with session.get(url=f"{base}/sdapi/v1/options", headers=auth) as r:
            r.raise_for_status()  # verify_url
        async with session.get(url=f"{base}/sdapi/v1/sd-models", headers=auth) as r:
            models = await r.json()
        seen["models"] = [{"id": m["title"], "name": m["model_name"]} for m in models]
        if model is not None:  # set_image_model: POST the whole options back with the new checkpoint
            async with session.get(url=f"{base}/sdapi/v1/options", headers=auth) as r:
                options = await r.json()
            seen["changed"] = model != options["sd_model_checkpoint"]
            if seen["changed"]:
                options["sd_model_checkpoint"] = model
                async with session.post(url=f"{base}/sdapi/v1/options", json=options, headers=auth) as r:
                    r.raise_for_status()
        async with session.get(url=f"{base}/sdapi/v1/options", headers=auth) as r:
            seen["model"] = (await r.json())["sd_model_checkpoint"]  # get_image_model
        data = {
            "prompt": prompt,
            "batch_size": n,
            "width": 64,
            "height": 64,
            "steps": 2,
            "negative_prompt": "blurry",
            "sampler_name": "Euler a",
        }  # fmt: skip  (+ AUTOMATIC1111_PARAMS)
        async with session.post(url=f"{base}/sdapi/v1/txt2img", json=data, headers=auth) as r:
            res = await r.json(content_type=None)  # no status check: res['images'] is what fails
        seen["images"] = [base64.b64decode(i) for i in res["images"]]  # get_image_data: no ',' -> image/png
        seen["info"] = res["info"]
    return seen


def test_open_webui_automatic1111_sequence(server: LiveServer) -> None:
    base = f"http://{server.address}"
    first = asyncio.run(open_webui_automatic1111(base, None, "a lighthouse", 1))
    assert first["model"] in [m["id"] for m in first["models"]]
    other = next(m["id"] for m in first["models"] if m["name"] == "other")
    seen = asyncio.run(open_webui_automatic1111(base, other, "a red lighthouse", 2))
    assert seen["changed"] and seen["model"] == other
    assert len(seen["images"]) == 2 and all(i.startswith(PNG) for i in seen["images"])
    info = json.loads(seen["info"])  # kept by Open WebUI as file metadata
    assert info["sd_model_name"] == "other" and info["batch_size"] == 2 and len(info["all_seeds"]) == 2
    # A second set with the model already current posts nothing.
    assert not asyncio.run(open_webui_automatic1111(base, other, "x", 1))["changed"]
    asyncio.run(open_webui_automatic1111(base, "mini.safetensors", "x", 1))


async def open_webui_comfyui(base: str, workflow: dict[str, Any], api_key: str) -> list[bytes]:
    """comfyui_create_image: ws with Bearer (even an empty key), queue_prompt, wait for
    `executing` node None of that prompt, get_history, then the SaveImage/PreviewImage URLs."""
    client_id = "5d6f5c1c-2f0a-4c1e-8a57-0c5d0d1b2a77"
    headers = {"Authorization": f"Bearer {api_key}"}
    ua = {"User-Agent": "Mozilla/5.0"}
    ws_url = base.replace("http://", "ws://")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{ws_url}/ws?clientId={client_id}", headers=headers) as ws:
            async with session.post(f"{base}/prompt", json={"prompt": workflow, "client_id": client_id},
                                    headers={**ua, **headers}) as r:  # fmt: skip
                r.raise_for_status()
                prompt_id = (await r.json())["prompt_id"]
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    message = json.loads(msg.data)
                    if message["type"] == "executing":
                        if message["data"]["node"] is None and message["data"]["prompt_id"] == prompt_id:
                            break
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    raise AssertionError(f"the socket closed: {msg.type}")
        async with session.get(f"{base}/history/{prompt_id}", headers={**ua, **headers}) as r:
            r.raise_for_status()
            history = (await r.json())[prompt_id]
        images = []
        for node_id, output in history["outputs"].items():
            if workflow[node_id]["class_type"] in ("SaveImage", "PreviewImage"):
                for image in output.get("images", []):
                    query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                    async with session.get(f"{base}/view?{query}", headers=headers) as r:  # get_image_data
                        r.raise_for_status()
                        assert r.headers["content-type"].split("/")[0] == "image"
                        images.append(await r.read())
    return images


def test_open_webui_comfyui_sequence(server: LiveServer) -> None:
    """The default workflow with Open WebUI's node mapping applied (model -> 4.ckpt_name, prompt ->
    6.text, width/height/n -> 5, steps -> 3.steps, seed -> 3.seed), its API key left empty."""
    workflow = json.loads(ST_WORKFLOW)
    workflow["3"]["inputs"].update(
        cfg=7, sampler_name="euler", scheduler="normal", seed=1125899906842624, steps=2
    )
    workflow["4"]["inputs"]["ckpt_name"] = "mini.safetensors"
    workflow["5"]["inputs"].update(width=64, height=64, batch_size=1)
    workflow["6"]["inputs"]["text"] = "a lighthouse"
    workflow["7"]["inputs"]["text"] = ""
    images = asyncio.run(open_webui_comfyui(f"http://{server.address}", workflow, ""))
    assert len(images) == 1 and images[0].startswith(PNG)


async def open_webui_comfyui_upload(base: str, png: bytes, api_key: str) -> dict[str, Any]:
    """comfyui_upload_image: multipart `image` (a uuid name, image/png) and `type=input` to
    /api/upload/image, Bearer only when a key is set; Open WebUI reads `name`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(png), filename="0b7c2d0e-5a1e-4c6b-9d1f-3e4a5b6c7d8e.png",
                   content_type="image/png")  # fmt: skip
    form.add_field("type", "input")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/api/upload/image", data=form, headers=headers) as resp:
            resp.raise_for_status()
            return dict(await resp.json())


def test_open_webui_comfyui_edit_sequence(server: LiveServer) -> None:
    """Open WebUI's image edit on ComfyUI: upload, put the returned name into the workflow's image
    node (LoadImage.image), run it over /ws, fetch the outputs."""
    picture = Image.new("RGB", (24, 16), (250, 10, 20))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    base = f"http://{server.address}"
    uploaded = asyncio.run(open_webui_comfyui_upload(base, buffer.getvalue(), ""))
    assert uploaded["type"] == "input" and uploaded["name"].endswith(".png")
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": uploaded["name"]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "edit"}},
    }
    [data] = asyncio.run(open_webui_comfyui(base, workflow, ""))
    edited = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert edited.shape == (16, 24, 3) and np.abs(edited[0, 0] - (5, 245, 235)).max() <= 1
