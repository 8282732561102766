"""HTTP routes the canvas extension (web/nodegraph.js) reads: LoRA metadata, previews and the default graph.

`GET /nodegraph/loras` lists every LoRA with its trigger words, base model and rank (with
`?checkpoint=<name>`, also whether each fits that checkpoint's family: `fits` true, false or null
when either family is unknown);
`GET /nodegraph/lora_info?name=` gives one; `GET /nodegraph/lora_preview?name=` sends the preview
image stored beside the file; `GET /nodegraph/default_workflow` is the first-start graph on the
installed models. Names go through `Folders.resolve`, so no request leaves the loras folder.
LoRA descriptions come from `nodes.lora_info` (the safetensors header and sidecar files, never the tensors).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from nodegraph.env import Environment
from nodegraph.folders import ModelNotFoundError, PathEscapeError
from nodegraph.server.frontend import web_dir
from nodes import lora_info
from nodes.sd.convert_sdxl import checkpoint_family, checkpoint_kind
from nodes.sd.lora.family import compatible, family_name


def describe_lora(name: str, path: Path) -> dict[str, Any]:
    """What the canvas shows for one LoRA (from `nodes.lora_info`); an unreadable file gets an `error`."""
    info: dict[str, Any] = {"name": name, "trigger_words": [], "base_model": "unknown", "rank": None}
    preview = lora_info.preview_image(path)
    info["preview_url"] = f"/nodegraph/lora_preview?name={quote(name)}" if preview else None
    try:
        described = lora_info.lora_info(path)
    except Exception as exc:  # noqa: BLE001 - one unreadable file is reported in its entry, never
        # allowed to take the whole picker down (a crafted header once made the list a 500)
        info["error"] = f"cannot read {path.name}: {exc}"
        return info
    family = str(described.get("family") or "unknown")
    info["trigger_words"] = list(described.get("trigger_words") or [])
    # The family as detected (metadata, then tensor shapes) reads better than kohya's "sd_v1".
    info["base_model"] = (
        family_name(family) if family != "unknown" else described.get("base_model") or "unknown"
    )
    if described.get("sdxl_base"):
        info["base_model"] += f" ({described['sdxl_base']})"
    info["family"] = family  # the canvas marks the LoRAs that fit the connected checkpoint's family
    info["rank"] = described.get("rank")
    info["alpha"] = described.get("alpha")
    info["format"] = described.get("format")
    info["title"] = described.get("title")
    return info


def _prefer(names: list[str], demo_first: bool) -> str | None:
    """The first name of the wanted kind (the demo's own files, or the user's), else the first at all."""
    wanted = [n for n in names if (Path(n).name.startswith("nodegraph_demo")) == demo_first]
    candidates = wanted or names
    return candidates[0] if candidates else None


def default_workflow(env: Environment) -> dict[str, Any]:
    """The canvas's first-start graph (web/default_workflow.json) set to the models this server has.

    A user's own checkpoint comes first (an SDXL refiner only when nothing else is there). On an
    SDXL-family checkpoint the graph asks for 1024x1024 (SDXL's native size) and a LoRA made for
    SDXL. On a random-weight demo checkpoint (`make run` on a fresh machine) the image is noise
    whatever its size, so the graph asks for 128x128 in 8 steps, which a CPU finishes in seconds.
    """
    graph: dict[str, Any] = json.loads((web_dir() / "default_workflow.json").read_text(encoding="utf-8"))
    names = list(env.folders.list("checkpoints"))
    checkpoint = _prefer(names, demo_first=False)
    kind = _kind(env, checkpoint)
    if kind == "sdxl_refiner":  # the refiner cannot start an image from text on its own
        others = [n for n in names if _kind(env, n) != "sdxl_refiner"]
        checkpoint = _prefer(others, demo_first=False) or checkpoint
        kind = _kind(env, checkpoint)
    on_demo = checkpoint is not None and Path(checkpoint).name.startswith("nodegraph_demo")
    loras = list(env.folders.list("loras"))
    if kind == "sdxl":
        loras = [n for n in loras if _lora_family(env, n) == "sdxl"] or loras
    lora = _prefer(loras, demo_first=on_demo)
    size = [128, 128] if on_demo else [1024, 1024] if kind == "sdxl" else None
    for node in graph["nodes"]:
        values = node.get("widgets_values")
        if node["type"] == "CheckpointLoaderSimple" and checkpoint:
            values[0] = checkpoint
        elif node["type"] == "LoraLoader" and lora:
            values[0] = lora
        elif node["type"] == "EmptyLatentImage" and size:
            values[0:2] = size
        elif node["type"] == "KSampler" and on_demo:
            values[2] = 8  # [seed, control_after_generate, steps, cfg, sampler, scheduler, denoise]
    return graph


def _kind(env: Environment, name: str | None) -> str:
    """ "sdxl", "sdxl_refiner" or "other" for a checkpoint, from its safetensors header alone."""
    if name is None:
        return "other"
    try:
        return checkpoint_kind(env.folders.resolve("checkpoints", name))
    except (PathEscapeError, ModelNotFoundError, OSError):
        return "other"


def checkpoint_family_of(env: Environment, name: str) -> str:
    """The family of a checkpoint file or diffusers folder the canvas names ("unknown" when not found)."""
    for folder in ("checkpoints", "diffusers"):
        try:
            return checkpoint_family(env.folders.resolve(folder, name))
        except (PathEscapeError, ModelNotFoundError, OSError):
            continue
    return "unknown"


def fits(lora_family: str, model_family: str) -> bool | None:
    """Whether a LoRA fits a checkpoint; None when either family is unknown (the canvas marks nothing)."""
    if "unknown" in (lora_family, model_family):
        return None
    return compatible(lora_family, model_family)


def _lora_family(env: Environment, name: str) -> str:
    try:
        return str(lora_info.lora_info(env.folders.resolve("loras", name)).get("family") or "unknown")
    except (PathEscapeError, ModelNotFoundError, OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _resolve(env: Environment, request: web.Request) -> tuple[str, Path]:
    name = request.query.get("name", "")
    if not name:
        raise web.HTTPBadRequest(text="give the LoRA file name as ?name=<name in the loras folder>")
    try:
        return name, env.folders.resolve("loras", name)
    except PathEscapeError as exc:
        raise web.HTTPForbidden(text=f"refused LoRA name: {exc}") from exc
    except (ModelNotFoundError, FileNotFoundError) as exc:
        raise web.HTTPNotFound(text=f"no LoRA named {name!r} in the loras folder") from exc


def routes(env: Environment) -> list[web.RouteDef]:
    """The canvas extension's routes (the server mounts them under `/` and `/api`)."""

    def describe_all(checkpoint: str | None) -> list[dict[str, Any]]:
        model_family = checkpoint_family_of(env, checkpoint) if checkpoint else None
        out = []
        for name in env.folders.list("loras"):
            try:
                info = describe_lora(name, env.folders.resolve("loras", name))
            except (PathEscapeError, FileNotFoundError):
                continue  # removed between listing and reading
            if model_family is not None:
                info["fits"] = fits(str(info.get("family", "unknown")), model_family)
                info["checkpoint_family"] = model_family
            out.append(info)
        return out

    async def loras(request: web.Request) -> web.Response:
        # Every header is read from disk: off the event loop, which must keep answering.
        checkpoint = request.query.get("checkpoint") or None
        return web.json_response(await asyncio.to_thread(describe_all, checkpoint))

    async def one_lora(request: web.Request) -> web.Response:
        name, path = _resolve(env, request)
        return web.json_response(await asyncio.to_thread(describe_lora, name, path))

    async def lora_preview(request: web.Request) -> web.StreamResponse:
        name, path = _resolve(env, request)
        image = lora_info.preview_image(path)
        if image is None:
            raise web.HTTPNotFound(text=f"no preview image beside LoRA {name!r}")
        return web.FileResponse(image)

    async def workflow(_: web.Request) -> web.Response:
        return web.json_response(default_workflow(env))

    # Plain `web.route` (not `web.get`, which adds HEAD via an `allow_head` keyword) so that the server
    # can re-register each RouteDef under `/` and `/api` with `router.add_route`.
    return [
        web.route("GET", "/nodegraph/loras", loras),
        web.route("GET", "/nodegraph/lora_info", one_lora),
        web.route("GET", "/nodegraph/lora_preview", lora_preview),
        web.route("GET", "/nodegraph/default_workflow", workflow),
    ]
