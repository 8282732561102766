"""AUTOMATIC1111's web API (`/sdapi/v1/...`) on nodegraph's queue, and OpenAI's image generation.

Requests become ComfyUI graphs (`a1111.Job.graph`), are validated and queued like `POST /prompt`
and waited for; the answer is A1111's `{images: [base64 PNG], parameters, info}` with its
infotext in each PNG's "parameters" chunk. Options (the checkpoint, CLIP skip) persist in the
user folder, as A1111's config.json does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import web

from nodegraph import __version__
from nodegraph.server import a1111
from nodegraph.server.a1111 import A1111Error
from nodegraph.server.a1111_inputs import open_image
from nodegraph.server.replies import read_json
from nodegraph.server.state import ServerState, state

routes = web.RouteTableDef()
API = "/sdapi/v1"
OPTIONS_FILE = "a1111_options.json"
VERSION = f"nodegraph {__version__}"
_hashes: dict[tuple[str, int, float], str] = {}  # (path, size, mtime) -> sha256


def _refuse(status: int, message: str) -> web.Response:
    """A1111's error shape (its `handle_exception` over FastAPI's HTTPException): `{"error": the
    exception's class name, "detail", "body", "errors"}`."""
    return web.json_response(
        {"error": "HTTPException", "detail": message, "body": "", "errors": message}, status=status
    )


def sha256_of(path: Path) -> str:
    """The file's sha256, kept per (path, size, mtime): checkpoints are gigabytes."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _known_hash(path: Path) -> str | None:
    stat = path.stat()
    return _hashes.get((str(path), stat.st_size, stat.st_mtime))


# ------------------------------------------------------------------------- options and models


def _options_path(st: ServerState) -> Path:
    return Path(st.engine.env.folders.user_dir) / "default" / OPTIONS_FILE


def _checkpoints(st: ServerState) -> list[str]:
    return list(st.engine.env.folders.list("checkpoints"))


def resolve_checkpoint(st: ServerState, name: str) -> str:
    """A checkpoint file name for A1111's title ("x.safetensors [hash]"), model name or file name."""
    names = _checkpoints(st)
    want = name.split(" [", 1)[0].strip().replace("\\", "/")
    for candidate in names:
        stem = candidate.rsplit(".", 1)[0]
        if want in (candidate, stem, PurePosixPath(candidate).name, PurePosixPath(stem).name):
            return candidate
    raise A1111Error(f"sd_model_checkpoint: no checkpoint {name!r} in the checkpoints folder")


def checkpoint_title(st: ServerState, name: str) -> str:
    """A1111's title for a checkpoint: "name [short hash]" once its hash is known, else the name.

    `sd-models` and the `sd_model_checkpoint` option both use it, so a client that preselects the
    current model in its list (SillyTavern, Open WebUI) finds it there."""
    sha = _known_hash(st.engine.env.folders.resolve("checkpoints", name))
    return f"{name} [{sha[:10]}]" if sha else name


def vae_names(st: ServerState) -> list[str]:
    return list(st.engine.env.folders.list("vae"))


def resolve_vae(st: ServerState, name: str | None) -> str | None:
    """A VAE file name for A1111's `sd_vae` ("Automatic" and "None": the checkpoint's own VAE)."""
    if name is None or str(name).strip() in ("", "Automatic", "None"):
        return None
    want = str(name).strip().replace("\\", "/")
    for candidate in vae_names(st):
        stem = candidate.rsplit(".", 1)[0]
        if want in (candidate, stem, PurePosixPath(candidate).name, PurePosixPath(stem).name):
            return candidate
    raise A1111Error(
        f'sd_vae: no VAE {name!r} in the vae folder; GET /sdapi/v1/sd-vae lists them, or send "Automatic"'
    )


def read_options(st: ServerState) -> dict[str, Any]:
    """A1111's options: what was set through POST /options over the defaults."""
    stored = _stored_options(_options_path(st))
    names = _checkpoints(st)
    options: dict[str, Any] = {
        "sd_model_checkpoint": names[0] if names else None,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "sd_vae": "Automatic",
        "sd_checkpoint_hash": None,
        "eta_noise_seed_delta": 0,
        "show_progress_every_n_steps": 1,
    }
    options.update({k: v for k, v in stored.items() if k in options and k != "sd_checkpoint_hash"})
    if options["sd_model_checkpoint"] is not None:
        try:
            options["sd_model_checkpoint"] = resolve_checkpoint(st, str(options["sd_model_checkpoint"]))
        except A1111Error:
            options["sd_model_checkpoint"] = names[0] if names else None
    if options["sd_model_checkpoint"] is not None:
        name = options["sd_model_checkpoint"]
        options["sd_checkpoint_hash"] = _known_hash(st.engine.env.folders.resolve("checkpoints", name))
        options["sd_model_checkpoint"] = checkpoint_title(st, name)
    try:
        options["sd_vae"] = resolve_vae(st, options["sd_vae"]) or options["sd_vae"]
    except A1111Error:
        options["sd_vae"] = "Automatic"
    return options


@routes.get(API + "/options")
async def get_options(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(read_options, state(request)))


@routes.post(API + "/options")
async def set_options(request: web.Request) -> web.Response:
    """Set `sd_model_checkpoint` (any of its names), `sd_vae` and `CLIP_stop_at_last_layers`; others
    are kept as sent (a client may post back the whole options object)."""
    st = state(request)
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return _refuse(422, "expected a JSON object of options")
    try:
        await asyncio.to_thread(write_options, st, body)
    except A1111Error as exc:
        return _refuse(422, str(exc))
    return web.json_response(None)


def write_options(st: ServerState, body: dict[str, Any]) -> None:
    """Check and store options; raises A1111Error naming a bad one (nothing is stored then)."""
    body = dict(body)
    if "sd_model_checkpoint" in body:
        body["sd_model_checkpoint"] = resolve_checkpoint(st, str(body["sd_model_checkpoint"]))
    if "sd_vae" in body:
        body["sd_vae"] = resolve_vae(st, body["sd_vae"]) or str(body["sd_vae"])
    if "CLIP_stop_at_last_layers" in body:
        body["CLIP_stop_at_last_layers"] = max(
            1, a1111.read_int(body, "CLIP_stop_at_last_layers", 1, 0, a1111.MAX_CLIP_SKIP)
        )
    path = _options_path(st)
    stored = _stored_options(path)
    stored.update({k: v for k, v in body.items() if k != "sd_checkpoint_hash"})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(stored, indent=1))
    os.replace(partial, path)  # a full disk never leaves a half-written options file


def _stored_options(path: Path) -> dict[str, Any]:
    """The options file's object; a missing or damaged file is no options."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return stored if isinstance(stored, dict) else {}


@routes.get(API + "/sd-models")
async def sd_models(request: web.Request) -> web.Response:
    st = state(request)
    folders = st.engine.env.folders

    def listing() -> list[dict[str, Any]]:
        out = []
        for name in _checkpoints(st):
            path = folders.resolve("checkpoints", name)
            sha = _known_hash(path)
            title = f"{name} [{sha[:10]}]" if sha else name
            short = sha[:10] if sha else None
            out.append({"title": title, "model_name": name.rsplit(".", 1)[0], "hash": short,
                        "sha256": sha, "filename": str(path), "config": None})  # fmt: skip
        return out

    return web.json_response(await asyncio.to_thread(listing))


@routes.get(API + "/loras")
async def loras(request: web.Request) -> web.Response:
    folders = state(request).engine.env.folders

    def listing() -> list[dict[str, Any]]:
        out = []
        for name in folders.list("loras"):
            stem = PurePosixPath(name).name.rsplit(".", 1)[0]
            out.append(
                {"name": stem, "alias": stem, "path": str(folders.resolve("loras", name)), "metadata": {}}
            )
        return out

    return web.json_response(await asyncio.to_thread(listing))


def _choices(st: ServerState, node: str, name: str) -> list[str]:
    cls = st.engine.registry.get(node)
    spec = cls.info(st.engine.env)["input"]["required"].get(name) if cls is not None else None
    return list(spec[0]) if spec and isinstance(spec[0], list) else []


@routes.get(API + "/samplers")
async def samplers(request: web.Request) -> web.Response:
    have = set(_choices(state(request), "KSampler", "sampler_name"))
    return web.json_response(
        [{"name": k, "aliases": [v], "options": {}} for k, v in a1111.SAMPLERS.items() if v in have]
    )


@routes.get(API + "/schedulers")
async def schedulers(request: web.Request) -> web.Response:
    have = set(_choices(state(request), "KSampler", "scheduler"))
    rows: list[dict[str, Any]] = [
        {
            "name": "automatic",
            "label": "Automatic",
            "aliases": None,
            "default_rho": -1,
            "need_inner_model": False,
        }
    ]
    for label, comfy in a1111.SCHEDULERS.items():
        if comfy in have:
            name = label.lower().replace(" ", "_")
            rows.append(
                {
                    "name": name,
                    "label": label,
                    "aliases": [comfy],
                    "default_rho": -1,
                    "need_inner_model": False,
                }
            )
    return web.json_response(rows)


@routes.get(API + "/upscalers")
async def upscalers(request: web.Request) -> web.Response:
    """A1111's image upscalers: "None", its built-in "Lanczos" and "Nearest", then the files in the
    upscale_models folder (usable as `hr_upscaler`; their scale is read from the model when it runs)."""
    folders = state(request).engine.env.folders

    def listing() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in a1111.IMAGE_UPSCALERS
        ]
        for name in folders.list("upscale_models"):
            stem = PurePosixPath(name).name.rsplit(".", 1)[0]
            path = str(folders.resolve("upscale_models", name))
            rows.append({"name": stem, "model_name": stem, "model_path": path, "model_url": None, "scale": 4})
        return rows

    return web.json_response(await asyncio.to_thread(listing))


@routes.get(API + "/latent-upscale-modes")
async def latent_modes(_: web.Request) -> web.Response:
    return web.json_response([{"name": n} for n in a1111.LATENT_UPSCALERS])


@routes.get(API + "/scripts")
async def scripts(_: web.Request) -> web.Response:
    return web.json_response({"txt2img": [], "img2img": []})


@routes.get(API + "/sd-vae")
async def sd_vae(request: web.Request) -> web.Response:
    """The vae folder as A1111 lists it: `[{model_name, filename}]` (model_name is the file name)."""
    st = state(request)
    folders = st.engine.env.folders

    def listing() -> list[dict[str, Any]]:
        return [{"model_name": n, "filename": str(folders.resolve("vae", n))} for n in vae_names(st)]

    return web.json_response(await asyncio.to_thread(listing))


@routes.get(API + "/prompt-styles")
async def prompt_styles(_: web.Request) -> web.Response:
    """A1111's saved styles (`[{name, prompt, negative_prompt}]`): nodegraph keeps none."""
    return web.json_response([])


@routes.get(API + "/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """The embeddings folder in A1111's shape: `{loaded: {name: {...}}, skipped: {}}`."""
    folders = state(request).engine.env.folders

    def listing() -> dict[str, Any]:
        loaded = {}
        for name in folders.list("embeddings"):
            stem = PurePosixPath(name).name.rsplit(".", 1)[0]
            shape, vectors = _embedding_shape(folders.resolve("embeddings", name))
            loaded[stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                            "shape": shape, "vectors": vectors}  # fmt: skip
        return {"loaded": loaded, "skipped": {}}

    return web.json_response(await asyncio.to_thread(listing))


def _embedding_shape(path: Path) -> tuple[int | None, int | None]:
    """(width, vector count) of a safetensors embedding, read from its header alone; None for others."""
    if path.suffix != ".safetensors":
        return None, None
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 1 << 20)))
        shapes = [
            v["shape"] for k, v in header.items() if k != "__metadata__" and len(v.get("shape", [])) == 2
        ]
    except (OSError, ValueError, AttributeError, TypeError):
        return None, None
    return (int(shapes[0][1]), int(shapes[0][0])) if shapes else (None, None)


@routes.get(API + "/cmd-flags")
async def cmd_flags(_: web.Request) -> web.Response:
    return web.json_response({})


@routes.get("/internal/ping")
async def internal_ping(_: web.Request) -> web.Response:
    """A1111's liveness check."""
    return web.json_response({})


@routes.post(API + "/refresh-checkpoints")
@routes.post(API + "/refresh-loras")
@routes.post(API + "/refresh-vae")
async def refresh(_: web.Request) -> web.Response:
    """Model folders are read at every request; nothing is cached to refresh."""
    return web.json_response(None)


# ------------------------------------------------------------------------- progress and control


@routes.get(API + "/progress")
async def progress(request: web.Request) -> web.Response:
    st = state(request)
    worker = st.worker
    step = worker.step if worker.running_id is not None else None
    value, total = step or (0, 0)
    skip_image = request.query.get("skip_current_image", "false").lower() == "true"
    preview = worker.preview if worker.running_id is not None and not skip_image else None
    remaining = await asyncio.to_thread(st.store.remaining)
    return web.json_response({
        "progress": value / total if total else 0.0,
        "eta_relative": 0.0,
        "state": {"skipped": False, "interrupted": False, "job": worker.running_id or "",
                  "job_count": remaining, "job_timestamp": "0", "job_no": 0, "sampling_step": value,
                  "sampling_steps": total},
        "current_image": base64.b64encode(preview.data).decode() if preview is not None else None,
        "textinfo": None,
    })  # fmt: skip


@routes.post(API + "/interrupt")
@routes.post(API + "/skip")
async def interrupt(request: web.Request) -> web.Response:
    state(request).worker.interrupt()
    return web.json_response(None)


@routes.post(API + "/png-info")
async def png_info(request: web.Request) -> web.Response:
    """The PNG's text chunks; A1111's "parameters" chunk parsed into fields."""
    body = await read_json(request, default={})
    raw = body.get("image") if isinstance(body, dict) else None
    if not isinstance(raw, str) or not raw:
        return _refuse(422, "image: send a base64-encoded PNG")
    try:
        with await asyncio.to_thread(open_image, raw, "image", decode=False) as image:
            items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    except A1111Error as exc:
        return _refuse(422, str(exc))
    text = items.pop("parameters", "")
    return web.json_response(
        {"info": text, "items": items, "parameters": a1111.parse_infotext(text) if text else {}}
    )
