"""Image generation for A1111 clients (`/sdapi/v1/txt2img`, `/sdapi/v1/img2img`) and OpenAI
clients (`/v1/images/generations`), on the same mapping: request -> ComfyUI graph -> queue -> PNGs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph.server import a1111
from nodegraph.server.a1111 import A1111Error, Job, read_float, read_int
from nodegraph.server.a1111_inputs import refuse_unsupported, save_init_image, save_mask
from nodegraph.server.replies import read_json
from nodegraph.server.routes_a1111 import (
    API,
    VERSION,
    _refuse,
    read_options,
    resolve_checkpoint,
    resolve_vae,
    sha256_of,
    write_options,
)
from nodegraph.server.routes_prompt import _accept
from nodegraph.server.state import ServerState, state

routes = web.RouteTableDef()
WAIT_S = 3600.0
MAX_BATCH_IMAGES = 64  # extra-batch-images: each is a queued prompt; more is a folder job, not a request


def build_job(st: ServerState, body: dict[str, Any], init_image: str | None = None) -> Job:
    """A1111's request fields (with `override_settings`) as a `Job`; raises A1111Error naming the field."""
    refuse_unsupported(body)
    options = read_options(st)
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise A1111Error("override_settings: expected an object")
    checkpoint = overrides.get("sd_model_checkpoint") or options["sd_model_checkpoint"]
    if not checkpoint:
        raise A1111Error("sd_model_checkpoint: the checkpoints folder is empty")
    sampler, scheduler = a1111.sampler_and_scheduler(
        str(body.get("sampler_name") or body.get("sampler_index") or "Euler"), body.get("scheduler")
    )
    seed = read_int(body, "seed", -1, -1, a1111.MAX_SEED)
    width = read_int(body, "width", 512, 8, a1111.MAX_SIDE)
    height = read_int(body, "height", 512, 8, a1111.MAX_SIDE)
    clip_skip = overrides.get("CLIP_stop_at_last_layers") or options["CLIP_stop_at_last_layers"]
    job = Job(
        prompt=_text(body, "prompt"),
        negative=_text(body, "negative_prompt"),
        steps=read_int(body, "steps", 50, 1, a1111.MAX_STEPS),
        cfg=read_float(body, "cfg_scale", 7.0, 0.0, 100.0),
        sampler=sampler,
        scheduler=scheduler,
        seed=random.randrange(4294967294) if seed == -1 else seed,
        width=width // 8 * 8,
        height=height // 8 * 8,
        batch_size=read_int(
            body, "batch_size", 1, 1, a1111.MAX_BATCH if init_image is None else a1111.MAX_REPEAT
        ),
        checkpoint=resolve_checkpoint(st, str(checkpoint)),
        clip_skip=max(
            1,
            read_int({"clip": clip_skip}, "clip", 1, 0, a1111.MAX_CLIP_SKIP, "CLIP_stop_at_last_layers"),
        ),
        init_image=init_image,
        vae=resolve_vae(st, overrides.get("sd_vae", options["sd_vae"])),
        save=bool(body.get("save_images")),
    )
    if init_image is not None:
        job.denoise = read_float(body, "denoising_strength", 0.75, 0.0, 1.0)
    elif body.get("enable_hr"):
        job.denoise = read_float(body, "denoising_strength", 0.7, 0.0, 1.0)
        job.hires = {
            **a1111.hires_size(body, job.width, job.height, upscale_models(st)),
            "steps": read_int(body, "hr_second_pass_steps", 0, 0, a1111.MAX_STEPS),
            "upscaler": str(body.get("hr_upscaler") or "Latent"),
        }
    return job


def _text(body: dict[str, Any], key: str) -> str:
    """A prompt field: text, or nothing; another JSON type is refused naming the field."""
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise A1111Error(f"{key}: expected a string, got {type(value).__name__}")
    return value


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def upscale_models(st: ServerState) -> dict[str, str]:
    """A1111's upscaler names for the upscale_models files (the file's stem) -> file name."""
    return {Path(n).name.rsplit(".", 1)[0]: n for n in st.engine.env.folders.list("upscale_models")}


async def queue_graph(st: ServerState, graph: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
    """Validate and queue one graph; the future gets its history entry. Raises A1111Error if invalid."""
    prompt_id = str(uuid.uuid4())
    future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    st.waiters.setdefault(prompt_id, []).append(future)
    # A client id no socket has: previews (asked for, for /progress) go to nobody.
    extra = {
        "client_id": f"a1111-{prompt_id}",
        "preview_method": "auto",
        "create_time": int(time.time() * 1000),
    }
    accepted = await asyncio.to_thread(_accept, st, {"prompt": graph}, extra, prompt_id, None)
    if isinstance(accepted, web.Response):
        st.waiters.get(prompt_id, []).remove(future)
        raise A1111Error(f"the graph for this request is invalid: {accepted.text}")
    return future


async def run_jobs(st: ServerState, job: Job, n_iter: int) -> list[tuple[Job, dict[str, Any]]]:
    """Queue `n_iter` graphs (seeds advance by the batch size, as A1111's do) and wait for all."""
    runs = []
    for n in range(n_iter):
        this = Job(**{**job.__dict__, "seed": job.seed + n * job.batch_size})
        runs.append((this, await queue_graph(st, this.graph())))
    results = []
    for this, future in runs:
        entry = await asyncio.wait_for(asyncio.shield(future), WAIT_S)
        results.append((this, entry))
    return results


def _images(st: ServerState, job: Job, entry: dict[str, Any]) -> list[tuple[bytes, str]]:
    """The run's images as PNG bytes with A1111's "parameters" chunk, and their infotexts."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    status = (entry or {}).get("status", {})
    if status.get("status_str") != "success":
        reason = _failure(status)
        if reason == "interrupted":
            return []  # A1111 answers an interrupted job with the images it has: none here
        raise RuntimeError(reason)
    folders = st.engine.env.folders
    roots = {"output": folders.output_dir, "temp": folders.temp_dir}
    ckpt = folders.resolve("checkpoints", job.checkpoint)
    model_hash = sha256_of(ckpt)[:10]
    lora_hashes = {}
    for name in a1111.lora_names(job.prompt):
        path = _lora_path(st, name)
        if path is not None:
            lora_hashes[name] = sha256_of(path)[:12]
    vae_hash = sha256_of(folders.resolve("vae", job.vae))[:10] if job.vae else None
    text = a1111.infotext(job, job.seed, model_hash, lora_hashes, VERSION, vae_hash)
    out = []
    for image in entry.get("outputs", {}).get("9", {}).get("images", []):
        path = Path(roots[image.get("type", "output")]) / image.get("subfolder", "") / image["filename"]
        info = PngInfo()
        info.add_text("parameters", text)
        buffer = io.BytesIO()
        with Image.open(path) as loaded:
            loaded.save(buffer, format="PNG", pnginfo=info)
        out.append((buffer.getvalue(), text))
    return out


def _lora_path(st: ServerState, name: str) -> Path | None:
    folders = st.engine.env.folders
    for candidate in folders.list("loras"):
        stem = candidate.rsplit(".", 1)[0]
        if name in (candidate, stem) or Path(stem).name == name:
            return Path(folders.resolve("loras", candidate))
    return None


def _failure(status: dict[str, Any]) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
        if kind == "execution_interrupted":
            return "interrupted"
    return "the prompt did not finish"


async def generate(request: web.Request, img2img: bool) -> web.Response:
    st = state(request)
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return _refuse(422, "expected a JSON object")
    try:
        init = None
        input_dir = Path(st.engine.env.folders.input_dir)
        if img2img:
            images = body.get("init_images")
            first = images[0] if isinstance(images, list) and images else None
            init = await asyncio.to_thread(save_init_image, input_dir, first)
        job = await asyncio.to_thread(build_job, st, body, init)
        overrides = body.get("override_settings") or {}
        if overrides and body.get("override_settings_restore_afterwards") is False:
            await asyncio.to_thread(write_options, st, overrides)  # A1111 then keeps them as options
        if img2img and body.get("mask"):
            size = await asyncio.to_thread(_image_size, input_dir / str(init))
            job.inpaint = await asyncio.to_thread(save_mask, input_dir, body, job.width, job.height, size)
        results = await run_jobs(st, job, read_int(body, "n_iter", 1, 1, a1111.MAX_N_ITER))
        pngs = []
        for this, entry in results:
            pngs += await asyncio.to_thread(_images, st, this, entry)
    except A1111Error as exc:
        return _refuse(422, str(exc))
    except RuntimeError as exc:
        return _refuse(500, f"the generation failed: {exc}")
    seeds = [this.seed for this, _ in results for _ in range(this.batch_size)]
    model_hash = a1111.parse_infotext(pngs[0][1]).get("Model hash") if pngs else None
    info: dict[str, Any] = {
        "prompt": job.prompt, "all_prompts": [job.prompt] * len(pngs), "negative_prompt": job.negative,
        "all_negative_prompts": [job.negative] * len(pngs), "seed": job.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(pngs), "subseed_strength": 0, "width": job.width,
        "height": job.height, "sampler_name": body.get("sampler_name") or "Euler", "cfg_scale": job.cfg,
        "steps": job.steps, "batch_size": job.batch_size, "restore_faces": False,
        "sd_model_name": job.checkpoint.rsplit(".", 1)[0], "sd_model_hash": model_hash,
        "denoising_strength": job.denoise, "clip_skip": job.clip_skip, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": [t for _, t in pngs], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "is_using_inpainting_conditioning": False, "version": VERSION,
    }  # fmt: skip
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    send = body.get("send_images", True) is not False  # A1111: send_images false -> no images
    return web.json_response(
        {
            "images": [base64.b64encode(p).decode() for p, _ in pngs] if send else [],
            "parameters": parameters,
            "info": json.dumps(info),
        }
    )


@routes.post(API + "/txt2img")
async def txt2img(request: web.Request) -> web.Response:
    return await generate(request, img2img=False)


@routes.post(API + "/img2img")
async def img2img(request: web.Request) -> web.Response:
    return await generate(request, img2img=True)


@routes.post("/v1/images/generations")
async def openai_generations(request: web.Request) -> web.Response:
    """OpenAI's image generation (`prompt`, `n`, `size`, `model` = a checkpoint, `response_format`
    b64_json) on the same mapping, with the A1111 options' defaults for everything else."""
    st = state(request)
    body = await read_json(request, default={})
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return _openai_error(400, "prompt: a string is required")
    try:
        width, _, height = str(body.get("size") or "512x512").partition("x")
        if not (width.isdigit() and height.isdigit() and len(width) < 6 and len(height) < 6):
            raise A1111Error(f"size: expected WIDTHxHEIGHT such as 1024x1024, got {body.get('size')!r}")
        a1111_body: dict[str, Any] = {
            "prompt": body["prompt"], "width": int(width), "height": int(height), "steps": 20,
            "batch_size": read_int(body, "n", 1, 1, a1111.MAX_BATCH), "sampler_name": "Euler", "seed": -1,
        }  # fmt: skip
        if body.get("model") and body["model"] not in ("dall-e-2", "dall-e-3", "gpt-image-1"):
            a1111_body["override_settings"] = {"sd_model_checkpoint": body["model"]}
        if body.get("response_format", "b64_json") != "b64_json":
            raise A1111Error("response_format: only b64_json is served (nodegraph keeps no public URLs)")
        job = await asyncio.to_thread(build_job, st, a1111_body)
        results = await run_jobs(st, job, 1)
        pngs = await asyncio.to_thread(_images, st, results[0][0], results[0][1])
    except (A1111Error, ValueError) as exc:
        return _openai_error(400, str(exc))
    except RuntimeError as exc:
        return _openai_error(500, f"the generation failed: {exc}")
    data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": job.prompt} for png, _ in pngs]
    return web.json_response({"created": int(time.time()), "data": data})


def _openai_error(status: int, message: str) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return web.json_response({"error": error}, status=status)


@routes.post(API + "/extra-single-image")
async def extra_single_image(request: web.Request) -> web.Response:
    """A1111's Extras upscale of one image: `upscaler_1` (None, Lanczos, Nearest or an upscale_models
    file through ImageUpscaleWithModel), then a resize to `upscaling_resize` times the size (mode 0)
    or to `upscaling_resize_w` x `upscaling_resize_h` (mode 1, centre-cropped if `upscaling_crop`)."""
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return _refuse(422, "expected a JSON object")
    try:
        data = await _upscaled(state(request), body, body.get("image"), "image")
    except A1111Error as exc:
        return _refuse(422, str(exc))
    except RuntimeError as exc:
        return _refuse(500, f"the upscale failed: {exc}")
    return web.json_response({"html_info": "", "image": base64.b64encode(data).decode()})


@routes.post(API + "/extra-batch-images")
async def extra_batch_images(request: web.Request) -> web.Response:
    """The same upscale for each of `imageList` (`[{data, name}]`, as A1111's ExtrasBatchImagesRequest):
    `{"html_info", "images": [base64 PNG, ...]}` in the order given."""
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return _refuse(422, "expected a JSON object")
    listed = body.get("imageList")
    if not isinstance(listed, list) or not listed:
        return _refuse(422, "imageList: send a list of {data: base64 image, name}")
    if len(listed) > MAX_BATCH_IMAGES:
        return _refuse(422, f"imageList: at most {MAX_BATCH_IMAGES} images per request, got {len(listed)}")
    found = []
    try:
        for i, item in enumerate(listed):
            if not isinstance(item, dict):
                raise A1111Error(f"imageList[{i}]: expected {{data, name}}, got {type(item).__name__}")
            try:
                found.append(await _upscaled(state(request), body, item.get("data"), f"imageList[{i}].data"))
            except A1111Error as exc:  # name the image the field belongs to
                raise A1111Error(f"imageList[{i}] ({str(item.get('name'))[:80]!r}): {exc}") from exc
    except A1111Error as exc:
        return _refuse(422, str(exc))
    except RuntimeError as exc:
        return _refuse(500, f"the upscale failed: {exc}")
    images = [base64.b64encode(data).decode() for data in found]
    return web.json_response({"html_info": "", "images": images})


async def _upscaled(st: ServerState, body: dict[str, Any], raw: Any, field: str) -> bytes:
    """One image (the request's `field`) through the Extras graph, run on the queue: the PNG it gives."""
    name = await asyncio.to_thread(save_init_image, Path(st.engine.env.folders.input_dir), raw, field)
    graph = await asyncio.to_thread(_extras_graph, st, body, name)
    entry = await asyncio.wait_for(asyncio.shield(await queue_graph(st, graph)), WAIT_S)
    status = (entry or {}).get("status", {})
    if status.get("status_str") != "success":
        raise RuntimeError(_failure(status))
    image = entry["outputs"]["9"]["images"][0]
    roots = {"output": st.engine.env.folders.output_dir, "temp": st.engine.env.folders.temp_dir}
    path = Path(roots[image.get("type", "temp")]) / image.get("subfolder", "") / image["filename"]
    return await asyncio.to_thread(path.read_bytes)


def _extras_graph(st: ServerState, body: dict[str, Any], image_name: str) -> dict[str, Any]:
    from PIL import Image

    for key in ("gfpgan_visibility", "codeformer_visibility", "extras_upscaler_2_visibility"):
        if read_float(body, key, 0.0, 0.0, 1.0) > 0:
            raise A1111Error(f"{key}: face restoration and a second upscaler are not available; send 0")
    upscaler = str(body.get("upscaler_1") or "None")
    models = upscale_models(st)
    if upscaler not in a1111.IMAGE_UPSCALERS and upscaler not in models:
        choices = ", ".join([*a1111.IMAGE_UPSCALERS, *models])
        raise A1111Error(
            f"upscaler_1: {upscaler!r} is not available ({choices}); GET /sdapi/v1/upscalers lists them"
        )
    with Image.open(Path(st.engine.env.folders.input_dir) / image_name) as image:
        width, height = image.size
    crop = "disabled"
    if read_int(body, "resize_mode", 0, 0, 1) == 1:
        width = read_int(body, "upscaling_resize_w", 512, 1, a1111.MAX_SIDE)
        height = read_int(body, "upscaling_resize_h", 512, 1, a1111.MAX_SIDE)
        crop = "center" if body.get("upscaling_crop", True) else "disabled"
    else:
        scale = read_float(body, "upscaling_resize", 2.0, 0.0, 8.0)
        if scale <= 0:
            raise A1111Error(f"upscaling_resize: must be above 0 and at most 8, got {scale}")
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
        if max(width, height) > a1111.MAX_SIDE:
            raise A1111Error(
                f"upscaling_resize: the result {width}x{height} is over {a1111.MAX_SIDE} pixels a side"
            )
    graph: dict[str, Any] = {"1": {"class_type": "LoadImage", "inputs": {"image": image_name}}}
    source: list[Any] = ["1", 0]
    if upscaler in models:
        graph["2"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": models[upscaler]}}
        graph["3"] = {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": source},
        }
        source = ["3", 0]
    method = a1111.IMAGE_UPSCALERS.get(upscaler, "lanczos")
    size = {"width": width, "height": height, "crop": crop}
    graph["4"] = {"class_type": "ImageScale", "inputs": {"image": source, "upscale_method": method, **size}}
    graph["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    return graph
