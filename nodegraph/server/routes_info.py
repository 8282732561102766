"""What the server knows about itself: nodes, model files, machine, features and canvas extensions."""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodegraph import __version__
from nodegraph.folders import MODEL_FOLDERS, ModelNotFoundError, PathEscapeError
from nodegraph.server import frontend
from nodegraph.server.replies import error
from nodegraph.server.state import state
from nodegraph.services import DeviceInfo, cpu_device

if TYPE_CHECKING:
    from nodegraph.engine import Engine

routes = web.RouteTableDef()
# A flag whose value is a secret: --auth-token, --api-auth, --api-key, --hf-token, --password ...
SECRET_FLAG = re.compile(
    r"^--?([\w-]*[-_])?(token|auth|key|secret|passw(or)?d|credentials?)s?([-_][\w-]*)?$", re.IGNORECASE
)
REDACTED = "<redacted>"


@routes.get("/object_info")
async def object_info(request: web.Request) -> web.Response:
    engine = state(request).engine
    # Combo choices list model folders: a disk walk, so off the event loop.
    info = await asyncio.to_thread(engine.registry.object_info, engine.env)
    return web.json_response(info)


@routes.get("/object_info/{node_class}")
async def object_info_one(request: web.Request) -> web.Response:
    engine = state(request).engine
    cls = engine.registry.get(request.match_info["node_class"])
    if cls is None:
        return web.json_response({})
    return web.json_response({cls.NODE_ID: await asyncio.to_thread(cls.info, engine.env)})


@routes.get("/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    """Embedding names without their extension (what `embedding:name` in a prompt refers to)."""
    folders = state(request).engine.env.folders
    names = await asyncio.to_thread(folders.list, "embeddings")
    return web.json_response([os.path.splitext(n)[0] for n in names])


@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    folders = state(request).engine.env.folders
    return web.json_response(sorted(set(MODEL_FOLDERS) | set(folders.model_dirs)))


@routes.get("/models/{folder}")
async def models_in(request: web.Request) -> web.Response:
    folders = state(request).engine.env.folders
    folder = folders.canonical(request.match_info["folder"])
    if folder not in folders.model_dirs:
        return error(404, "unknown_folder", f"no model folder named {folder!r}", "GET /models lists them")
    return web.json_response(await asyncio.to_thread(folders.list, folder))


def _safetensors_metadata(path: Path) -> dict[str, Any] | None:
    """The `__metadata__` of a .safetensors header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > 100 * 1024 * 1024:
            return None
        header = json.loads(f.read(size))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


@routes.get("/view_metadata/{folder}")
async def view_metadata(request: web.Request) -> web.Response:
    """A model file's safetensors metadata; the name goes through `Folders.resolve` (stays in its folder)."""
    folders = state(request).engine.env.folders
    name = request.query.get("filename", "")
    if not name.endswith(".safetensors"):
        return error(404, "not_found", "only .safetensors files carry metadata")
    try:
        path = folders.resolve(request.match_info["folder"], name)
        meta = await asyncio.to_thread(_safetensors_metadata, path)
    except PathEscapeError as exc:
        return error(403, "path_escape", "that model name leaves its folder", str(exc))
    except (ModelNotFoundError, OSError, ValueError, RecursionError) as exc:  # deep JSON: Recursion
        return error(404, "not_found", f"no readable model {name!r}", str(exc) or type(exc).__name__)
    if meta is None:
        return error(404, "not_found", f"{name} has no metadata")
    return web.json_response(meta)


@routes.get("/experiment/models")
async def experiment_models(request: web.Request) -> web.Response:
    folders = state(request).engine.env.folders
    return web.json_response(
        [
            {"name": name, "folders": [str(p) for p in folders.paths(name)]}
            for name in sorted(folders.model_dirs)
        ]
    )


@routes.get("/experiment/models/{folder}")
async def experiment_models_in(request: web.Request) -> web.Response:
    folders = state(request).engine.env.folders
    folder = folders.canonical(request.match_info["folder"])
    if folder not in folders.model_dirs:
        return error(404, "unknown_folder", f"no model folder named {folder!r}")
    names = await asyncio.to_thread(folders.list, folder)
    return web.json_response([{"name": n, "pathIndex": 0} for n in names])


def _memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0


@functools.cache  # reading package metadata scans sys.path: once per process is enough
def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line as ComfyUI shows it, with the values of secret flags (`--auth-token T`,
    `--api-key=K`) and the password of any URL (`https://user:pass@host`) replaced."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            shown.append(REDACTED)
            hide_next = False
            continue
        flag, eq, value = arg.partition("=")
        secret = bool(SECRET_FLAG.match(flag))
        hide_next = secret and not eq
        if secret and eq:
            arg = f"{flag}={REDACTED}"
        shown.append(re.sub(r"(://[^/@:\s]*):[^/@\s]*@", rf"\1:{REDACTED}@", arg))
    return shown


def system_stats(engine: Engine) -> dict[str, Any]:
    """`/system_stats` (§4.1), without importing torch: versions come from package metadata, the
    device from the node layer's `DeviceInfo` service (the CPU when no node package registers one)."""
    total, free = _memory()
    service = engine.env.services.get(DeviceInfo)
    device = service.describe() if isinstance(service, DeviceInfo) else cpu_device()
    return {
        "system": {
            "os": os.name,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": f"nodegraph {__version__}",
            "required_frontend_version": _version("comfyui-frontend-package"),
            "installed_templates_version": "",
            "required_templates_version": "",
            "python_version": sys.version,
            "pytorch_version": _version("torch"),
            "embedded_python": False,
            "argv": redacted_argv(sys.argv),
            "platform": platform.platform(),
        },
        "devices": [device],
    }


@routes.get("/system_stats")
async def get_system_stats(request: web.Request) -> web.Response:
    st = state(request)
    stats = system_stats(st.engine)
    # the workers that run prompts (several with `serve --workers N`); asking remote ones takes time
    stats["workers"] = await asyncio.to_thread(st.worker.describe)
    return web.json_response(stats)


@routes.get("/features")
async def features(request: web.Request) -> web.Response:
    return web.json_response(state(request).features())


@routes.get("/extensions")
async def extensions(request: web.Request) -> web.Response:
    """JS module URLs the canvas imports at start (ComfyUI's extension hook)."""
    return web.json_response(list(frontend.extension_urls()))


@routes.get("/i18n")
async def i18n(request: web.Request) -> web.Response:
    return web.json_response({})


@routes.get("/workflow_templates")
async def workflow_templates(request: web.Request) -> web.Response:
    return web.json_response({})


@routes.get("/internal/folder_paths")
async def folder_paths(request: web.Request) -> web.Response:
    folders = state(request).engine.env.folders
    return web.json_response(
        {name: [str(p) for p in folders.paths(name)] for name in sorted(folders.model_dirs)}
    )


@routes.get("/internal/files/{directory_type}")
async def internal_files(request: web.Request) -> web.Response:
    folders = state(request).engine.env.folders
    kind = request.match_info["directory_type"]
    if kind not in ("output", "input", "temp"):
        return error(400, "invalid_type", f"directory type {kind!r} is not output, input or temp")
    base = Path(folders.data_dir(kind))

    def newest_first() -> list[str]:
        files = [p for p in base.iterdir() if p.is_file()] if base.is_dir() else []
        return [p.name for p in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)]

    return web.json_response(await asyncio.to_thread(newest_first))
