"""Each field of a plausible body, on every route that reads one, made hostile in turn: never a 5xx.

The routes come from the app's router (`test_route_sweep.swept_routes`); every POST route is listed
in BODIES, FORMS or NO_BODY, so a new route fails `test_every_post_route_is_listed` until its body is
described here. Each field of the plausible body (top level, one level into objects, the first item
of lists) is replaced by each hostile value: wrong JSON types, absurd and non-finite numbers, long,
odd and path-like text; image fields also get malformed, truncated, huge and decompression-bomb
base64 images. The engine has the real node declarations (graphs validate by name against empty
model files) and an executor that finishes every prompt at once with one small image, so a request
that passes its checks is answered as a real one would be, without sampling. Every request must be
answered within `REQUEST_S`, without a 5xx, and an A1111 4xx must name the field it refuses.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient
from PIL import Image

from nodegraph.engine import Engine, Settings, build_engine
from nodegraph.executor import Outcome
from nodegraph.server import create_app
from nodegraph.server.worker import Worker
from tests.server.test_route_sweep import swept_routes

pytestmark = pytest.mark.asyncio

REQUEST_S = 20.0


def png(size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "white").save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose data is one empty row: 69 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = b64(png())
VALUES: list[Any] = [
    None, True, -1, 0, 2**64, 10**40, 1e308, 0.5, float("inf"), float("nan"), "", "x" * 100_000, "\x00",
    "../../outside/secret.txt", "/etc/passwd", "\u202e\U0001f600\u0301", "123", [], {}, [[[[["x"]]]]],
    {"a": {"b": None}}, [None] * 1000,
]  # fmt: skip
IMAGE_VALUES: list[Any] = [
    "not base64 !!", "data:image/png;base64,AAAA", "\u00e9" * 10, b64(png()[:40]),
    b64(png_header(65535, 65535)), b64(png_header(12000, 12000)),
    b64(png_header(9000, 9000)), b64(b"GIF89a" + b"\0" * 30),
    b64(bytes(3 * 1024 * 1024)), "data:image/png;base64," + PNG[:-7],
]  # fmt: skip
IMAGE_FIELDS = {"init_images[0]", "mask", "image", "imageList[0].data"}
_EXTRAS = {
    "upscaler_1": "Lanczos", "upscaling_resize": 2, "resize_mode": 0, "upscaling_resize_w": 64,
    "upscaling_resize_h": 64, "upscaling_crop": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
    "extras_upscaler_2_visibility": 0,
}  # fmt: skip
_TXT2IMG = {
    "prompt": "a chair <lora:mini:0.5>", "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7,
    "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "seed": 1, "sampler_name": "Euler",
    "scheduler": "Automatic",
    "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_second_pass_steps": 0, "denoising_strength": 0.5, "subseed_strength": 0, "restore_faces": False,
    "styles": [], "save_images": False, "send_images": True, "override_settings_restore_afterwards": True,
    "override_settings": {"sd_model_checkpoint": "mini", "CLIP_stop_at_last_layers": 2,
                          "sd_vae": "Automatic"},
}  # fmt: skip
_IMG2IMG = {
    **{k: v for k, v in _TXT2IMG.items() if not k.startswith(("hr_", "enable_hr"))},
    "init_images": [PNG], "mask": PNG, "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": True,
    "inpaint_full_res_padding": 32, "inpainting_mask_invert": 0, "resize_mode": 0,
}  # fmt: skip
# List semantics (RebatchLatents gives a list of batches) and GLIGEN boxes, as a prompt's nodes.
_PROMPT = {
    "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
    "2": {"class_type": "RebatchLatents", "inputs": {"latents": ["1", 0], "batch_size": 1}},
    "3": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "x"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a room", "clip": ["4", 1]}},
    "6": {"class_type": "GLIGENLoader", "inputs": {"gligen_name": "mini.safetensors"}},
    "7": {"class_type": "GLIGENTextBoxApply", "inputs": {"conditioning_to": ["5", 0], "clip": ["4", 1],
          "gligen_textbox_model": ["6", 0], "text": "a chair", "width": 64, "height": 64, "x": 0, "y": 8}},
    "8": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "positive": ["7", 0], "negative": ["5", 0],
          "latent_image": ["2", 0], "seed": 1, "steps": 1, "cfg": 7.0, "sampler_name": "euler",
          "scheduler": "normal", "denoise": 1.0}},
}  # fmt: skip
BODIES: dict[str, Any] = {
    "/prompt": {"prompt": _PROMPT, "client_id": "c", "number": 1, "front": False, "extra_data": {},
                "partial_execution_targets": ["3"]},
    "/queue": {"clear": False, "delete": ["x"]},
    "/history": {"clear": False, "delete": ["x"]},
    "/interrupt": {"prompt_id": "x"},
    "/free": {"unload_models": False, "free_memory": False},
    "/settings": {"Comfy_Zoom": 1},
    "/settings/{id}": {"value": 1},
    "/jobs/cancel": {"job_ids": [str(uuid.uuid4())]},
    "/models/download": {"models": [{"name": "x.safetensors", "url": "https://x",
                                     "directory": "checkpoints"}]},
    "/sdapi/v1/options": {"sd_model_checkpoint": "mini", "sd_vae": "Automatic",
                          "CLIP_stop_at_last_layers": 2},
    "/sdapi/v1/png-info": {"image": PNG},
    "/sdapi/v1/txt2img": _TXT2IMG,
    "/sdapi/v1/img2img": _IMG2IMG,
    "/sdapi/v1/extra-single-image": {"image": PNG, **_EXTRAS},
    "/sdapi/v1/extra-batch-images": {"imageList": [{"data": PNG, "name": "a.png"}], **_EXTRAS},
    "/v1/images/generations": {"prompt": "a", "n": 1, "size": "64x64", "model": "mini",
                               "response_format": "b64_json"},
    "/v2/jobs": {"workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8,
                 "batch_size": 1, "color": 0}},
                 "9": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}},
                 "extra_data": {"api_key_comfy_org": "k"}, "metadata": {"a": "b"}},
    "/v2/assets/from-hash": {"hash": "blake3:00"},
}  # fmt: skip
FORMS: dict[str, dict[str, Any]] = {
    "/upload/image": {"image": ("a.png", png()), "subfolder": "s", "type": "input", "overwrite": "true"},
    "/upload/mask": {"image": ("m.png", png(mode="RGBA")), "subfolder": "", "type": "input",
                     "original_ref": json.dumps({"filename": "orig.png", "subfolder": "", "type": "input"})},
    "/v2/assets": {"file": ("a.png", png()), "file_path": "a.png", "content_type": "image/png",
                   "expected_hash": "", "tags": "input"},
}  # fmt: skip
NO_BODY = {
    "/prompt/{prompt_id}/cancel", "/jobs/{job_id}/cancel", "/v2/jobs/{id}/cancel",
    "/userdata/{file}/move/{dest}",
    "/userdata/{file}",  # raw bytes: the route sweep and test_fuzz send it hostile ones
    "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-vae",
    "/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/unload-checkpoint", "/sdapi/v1/reload-checkpoint",
}  # fmt: skip
PLAUSIBLE = {"/models/download": 403, "/v2/assets/from-hash": 404}  # what the plausible body gets
# text fields; a tuple is a file sent under a text field's name (`overwrite` as a file was a 500)
TEXT_VALUES: list[Any] = [
    "", "../../outside/x.png", "/etc/passwd", "x" * 300, "a\x00b", "s/" * 2000, "\u202e\U0001f600", "{[",
    ("f.txt", b"\xff\xfe\x00"), "image/svg+xml", "text/html\r\nX-Evil: 1", "blake3:" + "f" * 64,
]  # fmt: skip
FILE_VALUES: list[tuple[str, bytes]] = [
    ("bomb.png", png_header(65535, 65535)), ("big.png", png_header(12000, 12000)), ("cut.png", png()[:40]),
    ("x" * 300 + ".png", png()), ("a\u00e9\u202eb.png", png()), ("../x.png", png()), ("", png()),
    ("page.svg", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"),
]  # fmt: skip


class InstantExecutor:
    """Finishes every prompt at once: each output node "shows" one small PNG in temp/."""

    def __init__(self, env: Any) -> None:
        self.env = env

    def execute(self, prompt: dict[str, Any], prompt_id: str, emit: Any, **_: Any) -> Outcome:
        done = Path(self.env.folders.temp_dir) / "done.png"  # temp/ is emptied when the server starts
        if not done.exists():
            done.write_bytes(png())
        image = {"filename": "done.png", "subfolder": "", "type": "temp"}
        return Outcome("success", outputs={"9": {"images": [image]}})

    def interrupt(self, prompt_id: str | None = None) -> None:
        pass


def field_engine(base: Path) -> Engine:
    from nodes import all_nodes, register_services

    for folder, name in (("checkpoints", "mini.safetensors"), ("vae", "v.safetensors"),
                         ("upscale_models", "x2.safetensors"), ("loras", "mini.safetensors"),
                         ("gligen", "mini.safetensors")):  # fmt: skip
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).write_bytes(b"")  # validation looks at names only
    engine = build_engine(
        Settings(base_directory=base, port=0), nodes=all_nodes(), services=register_services
    )
    folders = engine.env.folders
    for d in (folders.output_dir, folders.input_dir, folders.temp_dir, folders.user_dir):
        d.mkdir(parents=True, exist_ok=True)
    (Path(folders.input_dir) / "orig.png").write_bytes(png())
    return engine


def instant_workers(store: Any, executor: Any, *rest: Any) -> Worker:
    return Worker(store, InstantExecutor(executor.env), *rest)


def _paths(value: Any, prefix: str = "", depth: int = 0) -> Iterator[str]:
    """The field paths of a body: keys (`a.b`) and first list items (`a[0]`), four levels deep
    (a prompt's `prompt.7.inputs.width`)."""
    items = value.items() if isinstance(value, dict) else [("[0]", value[0])] if value else []
    for key, item in items:
        path = f"{prefix}{key}" if key == "[0]" else f"{prefix}.{key}" if prefix else str(key)
        yield path
        if depth < 3 and isinstance(item, (dict, list)):
            yield from _paths(item, path, depth + 1)


def _set(body: Any, path: str, value: Any) -> Any:
    body = copy.deepcopy(body)
    keys = [k for part in path.replace("[0]", ".[0]").split(".") if (k := part)]
    target = body
    for key in keys[:-1]:
        target = target[0] if key == "[0]" else target[key]
    last = keys[-1]
    if last == "[0]":
        target[0] = value
    else:
        target[last] = value
    return body


def canonical_posts(app: web.Application) -> set[str]:
    return {r.canonical for m, r in swept_routes(app) if m == "POST"}


async def test_every_post_route_is_listed(aiohttp_client: Any, tmp_path: Path) -> None:
    app = create_app(field_engine(tmp_path), workers=instant_workers)
    posts = canonical_posts(app)
    listed = set(BODIES) | set(FORMS) | NO_BODY
    assert posts == listed, f"not listed: {sorted(posts - listed)}; gone: {sorted(listed - posts)}"


async def _post(client: TestClient, path: str, **kwargs: Any) -> tuple[int, str]:
    async def send() -> tuple[int, str]:
        async with client.post(path.replace("{id}", "k").replace("{prompt_id}", "p"), **kwargs) as resp:
            return resp.status, await resp.text()

    try:
        return await asyncio.wait_for(send(), REQUEST_S)
    except asyncio.TimeoutError:
        return 0, f"no answer in {REQUEST_S} s"


async def test_every_field_of_every_body_made_hostile(aiohttp_client: Any, tmp_path: Path) -> None:
    engine = field_engine(tmp_path)
    client: TestClient = await aiohttp_client(create_app(engine, workers=instant_workers))
    failures: list[str] = []
    sent = 0
    for route, body in BODIES.items():
        status, text = await _post(client, route, json=body)
        assert status < 400 or status == PLAUSIBLE.get(route), (route, text[:300])  # it is served
        for path in _paths(body):
            for value in IMAGE_VALUES + VALUES if path in IMAGE_FIELDS else VALUES:
                data = json.dumps(_set(body, path, value), allow_nan=True)
                status, text = await _post(client, route, data=data)
                sent += 1
                field = path.split(".")[-1].split("[")[0]
                shown = f"POST {route} {path}={str(value)[:40]!r}: {status} {text[:300]}"
                if status == 0 or status >= 500:
                    failures.append(shown)
                elif route.startswith("/sdapi/") and status == 422 and field not in text:
                    failures.append(f"{shown} (the answer does not name {field!r})")
    for route, fields in FORMS.items():
        for name in fields:
            for value in FILE_VALUES if isinstance(fields[name], tuple) else TEXT_VALUES:
                form = FormData()
                for key, item in {**fields, name: value}.items():
                    if isinstance(item, tuple):
                        form.add_field(key, item[1], filename=item[0] or "x", content_type="image/png")
                    else:
                        form.add_field(key, item)
                status, text = await _post(client, route, data=form)
                sent += 1
                if status == 0 or status >= 500:
                    failures.append(f"POST {route} {name}={str(value)[:40]!r}: {status} {text[:300]}")
    assert sent > 1000
    assert not failures, f"{len(failures)} of {sent} failed:\n" + "\n".join(failures[:80])
