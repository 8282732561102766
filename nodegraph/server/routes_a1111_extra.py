"""The rest of A1111's `/sdapi/v1` that clients read at start-up or call for housekeeping: memory,
hypernetworks, face restorers and Real-ESRGAN models (none: nodegraph has neither), extensions,
and checkpoint unload/reload. Shapes as A1111's modules/api/models.py declares them."""

from __future__ import annotations

import asyncio
from pathlib import PurePosixPath
from typing import Any

from aiohttp import web

from nodegraph.server.routes_a1111 import API
from nodegraph.server.routes_info import system_stats
from nodegraph.server.state import state

routes = web.RouteTableDef()


@routes.get(API + "/memory")
async def memory(request: web.Request) -> web.Response:
    """`{ram: {free, used, total}, cuda: {system: {free, used, total}} or {error}}`, in bytes."""
    stats = await asyncio.to_thread(system_stats, state(request).engine)
    total, free = stats["system"]["ram_total"], stats["system"]["ram_free"]
    device = stats["devices"][0] if stats["devices"] else {}
    cuda: dict[str, Any] = {"error": "no CUDA device"}
    if device.get("type") == "cuda":
        vram, vram_free = device.get("vram_total", 0), device.get("vram_free", 0)
        cuda = {"system": {"free": vram_free, "used": vram - vram_free, "total": vram}}
    return web.json_response({"ram": {"free": free, "used": total - free, "total": total}, "cuda": cuda})


@routes.get(API + "/hypernetworks")
async def hypernetworks(request: web.Request) -> web.Response:
    """The hypernetworks folder: `[{name, path}]` (HypernetworkLoader applies them in graphs)."""
    folders = state(request).engine.env.folders

    def listing() -> list[dict[str, Any]]:
        return [
            {
                "name": PurePosixPath(n).name.rsplit(".", 1)[0],
                "path": str(folders.resolve("hypernetworks", n)),
            }
            for n in folders.list("hypernetworks")
        ]

    return web.json_response(await asyncio.to_thread(listing))


@routes.get(API + "/face-restorers")
@routes.get(API + "/realesrgan-models")
@routes.get(API + "/extensions")
async def none_here(_: web.Request) -> web.Response:
    """Face restorers, A1111's bundled Real-ESRGAN models and extensions: nodegraph has none
    (upscale models are files in models/upscale_models, listed by /sdapi/v1/upscalers)."""
    return web.json_response([])


@routes.post(API + "/unload-checkpoint")
async def unload_checkpoint(request: web.Request) -> web.Response:
    """Free the loaded models, as ComfyUI's `/free` does (between prompts, never under a running one)."""
    state(request).worker.request_free(True, True)
    return web.json_response(None)


@routes.post(API + "/reload-checkpoint")
async def reload_checkpoint(_: web.Request) -> web.Response:
    """Nothing to do: a checkpoint is loaded when the next prompt needs it."""
    return web.json_response(None)
