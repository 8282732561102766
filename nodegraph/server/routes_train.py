"""The canvas's Train LoRA panel (web/train_panel.js): `GET /nodegraph/train/datasets`.

It lists the kohya dataset folders under the input directory (the TrainLora node's `dataset`
choices) with each subfolder's repeats, image and caption counts and the images per epoch, so a
user sees what a run will do before starting it (`nodegraph.train_datasets`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from nodegraph.server.routes_lora import ENV
from nodegraph.train_datasets import list_datasets

routes = web.RouteTableDef()


@routes.route("GET", "/nodegraph/train/datasets")
async def datasets(request: web.Request) -> web.Response:
    root = Path(request.app[ENV].folders.data_dir("input"))
    # A directory walk: off the event loop, which must keep answering.
    return web.json_response(await asyncio.to_thread(list_datasets, root))
