"""The canvas extension's routes (web/nodegraph.js): LoRA metadata and previews, the first-start graph.

`GET /nodegraph/loras` lists every LoRA with its trigger words, base model and rank (with
`?checkpoint=<name>`, also whether each fits that checkpoint's family: `fits` true, false or null
when either family is unknown);
`GET /nodegraph/lora_info?name=` gives one; `GET /nodegraph/lora_preview?name=` sends the preview
image stored beside the file; `GET /nodegraph/default_workflow` is the first-start graph on the
installed models. The LoRA routes read the `LoraCatalog` service the node layer registers; each
runs on a thread, since describing many LoRAs reads many file headers and must not stall the
websocket's progress messages.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph.env import Environment
from nodegraph.folders import ModelNotFoundError, PathEscapeError
from nodegraph.server.frontend import web_dir
from nodegraph.services import CheckpointCatalog, LoraCatalog

ENV = web.AppKey("nodegraph_env", Environment)
DEMO_PREFIX = "nodegraph_demo"  # the random-weight demo model's files (`nodegraph demo`)

# Plain `web.route` (not `web.get`, which adds HEAD via an `allow_head` keyword) so that the server
# can re-register each RouteDef under `/` and `/api`.
routes = web.RouteTableDef()


def _loras(env: Environment) -> LoraCatalog | None:
    # Looked up by isinstance: a Protocol is no concrete class for `env.service`'s `type[T]` (mypy).
    found = env.services.get(LoraCatalog)
    return found if isinstance(found, LoraCatalog) else None


def _checkpoints(env: Environment) -> CheckpointCatalog | None:
    found = env.services.get(CheckpointCatalog)
    return found if isinstance(found, CheckpointCatalog) else None


def _catalog(request: web.Request) -> LoraCatalog:
    found = _loras(request.app[ENV])
    if found is None:
        raise web.HTTPNotFound(text="this engine has no LoRA catalog (its nodes register none)")
    return found


def _name(request: web.Request) -> str:
    name = request.query.get("name", "")
    if not name:
        raise web.HTTPBadRequest(text="give the LoRA file name as ?name=<name in the loras folder>")
    return name


async def _ask(request: web.Request, call: Any, name: str) -> Any:
    """Run one catalog call on a thread; a refused or missing name is a 403 or 404 naming it."""
    try:
        return await asyncio.to_thread(call, name)
    except PathEscapeError as exc:
        raise web.HTTPForbidden(text=f"refused LoRA name: {exc}") from exc
    except (ModelNotFoundError, FileNotFoundError) as exc:
        raise web.HTTPNotFound(text=f"no LoRA named {name!r} in the loras folder") from exc


@routes.route("GET", "/nodegraph/loras")
async def loras(request: web.Request) -> web.Response:
    checkpoint = request.query.get("checkpoint") or None
    return web.json_response(await asyncio.to_thread(_catalog(request).list, checkpoint))


@routes.route("GET", "/nodegraph/lora_info")
async def lora_info(request: web.Request) -> web.Response:
    name = _name(request)
    return web.json_response(await _ask(request, _catalog(request).describe, name))


@routes.route("GET", "/nodegraph/lora_preview")
async def lora_preview(request: web.Request) -> web.StreamResponse:
    name = _name(request)
    image: Path | None = await _ask(request, _catalog(request).preview, name)
    if image is None:
        raise web.HTTPNotFound(text=f"no preview image beside LoRA {name!r}")
    return web.FileResponse(image)


@routes.route("GET", "/nodegraph/default_workflow")
async def workflow(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(default_workflow, request.app[ENV]))


def _prefer(names: list[str], demo_first: bool) -> str | None:
    """The first name of the wanted kind (the demo's own files, or the user's), else the first at all."""
    wanted = [n for n in names if Path(n).name.startswith(DEMO_PREFIX) == demo_first]
    candidates = wanted or names
    return candidates[0] if candidates else None


def default_workflow(env: Environment) -> dict[str, Any]:
    """The canvas's first-start graph (web/default_workflow.json) set to the models this server has.

    A user's own checkpoint comes first (an SDXL refiner only when nothing else is there). On an
    SDXL-family checkpoint the graph asks for 1024x1024 (SDXL's native size) and a LoRA made for
    SDXL. On a random-weight demo checkpoint (`make run` on a fresh machine) the image is noise
    whatever its size, so the graph asks for 128x128 in 8 steps, which a CPU finishes in seconds.
    Kinds and families come from the node layer's catalogs; without them every model is "other".
    """
    graph: dict[str, Any] = json.loads((web_dir() / "default_workflow.json").read_text(encoding="utf-8"))
    names = list(env.folders.list("checkpoints"))
    checkpoint = _prefer(names, demo_first=False)
    kind = _kind(env, checkpoint)
    if kind == "sdxl_refiner":  # the refiner cannot start an image from text on its own
        others = [n for n in names if _kind(env, n) != "sdxl_refiner"]
        checkpoint = _prefer(others, demo_first=False) or checkpoint
        kind = _kind(env, checkpoint)
    on_demo = checkpoint is not None and Path(checkpoint).name.startswith(DEMO_PREFIX)
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
    """ "sdxl", "sdxl_refiner" or "other" for a checkpoint (the `CheckpointCatalog` service's answer)."""
    catalog = _checkpoints(env)
    return "other" if name is None or catalog is None else catalog.kind(name)


def _lora_family(env: Environment, name: str) -> str:
    catalog = _loras(env)
    if catalog is None:
        return "unknown"
    try:
        return str(catalog.describe(name).get("family") or "unknown")
    except (PathEscapeError, ModelNotFoundError, OSError):
        return "unknown"
