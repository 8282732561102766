"""The canvas's Train LoRA panel (web/train_panel.js): `GET /nodegraph/train/datasets` and
`GET /nodegraph/train/defaults?checkpoint=NAME`.

The first lists the kohya dataset folders under the input directory (the TrainLora node's `dataset`
choices) with each subfolder's repeats, image and caption counts and the images per epoch, so a
user sees what a run will do before starting it (`nodegraph.train_datasets`). The second gives the
options that depend on the checkpoint's family (read from its header by the `CheckpointCatalog`
service): the training size, 1024,1024 for SDXL and 512,512 otherwise, which the panel shows until
the user sets one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph.env import Environment
from nodegraph.server.routes_lora import ENV
from nodegraph.services import CheckpointCatalog
from nodegraph.train_config import default_resolution
from nodegraph.train_datasets import list_datasets

routes = web.RouteTableDef()


@routes.route("GET", "/nodegraph/train/datasets")
async def datasets(request: web.Request) -> web.Response:
    root = Path(request.app[ENV].folders.data_dir("input"))
    # A directory walk: off the event loop, which must keep answering.
    return web.json_response(await asyncio.to_thread(list_datasets, root))


@routes.route("GET", "/nodegraph/train/defaults")
async def defaults(request: web.Request) -> web.Response:
    name = request.query.get("checkpoint") or None
    # A header read: off the event loop.
    return web.json_response(await asyncio.to_thread(family_defaults, request.app[ENV], name))


def family_defaults(env: Environment, checkpoint: str | None) -> dict[str, Any]:
    """{"checkpoint", "kind" ("sdxl", "sdxl_refiner" or "other"), "resolution" ("W,H")}."""
    catalog = env.services.get(CheckpointCatalog)
    kind = catalog.kind(checkpoint) if checkpoint and isinstance(catalog, CheckpointCatalog) else "other"
    return {"checkpoint": checkpoint, "kind": kind, "resolution": default_resolution(kind)}
