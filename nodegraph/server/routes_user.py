"""Per-user files: `/settings`, `/userdata`, `/v2/userdata`, `/users` (one user, "default").

Every path is joined with `safe_join` under `user/default/`, so neither `..` nor an absolute
path nor a symlink out of it reaches another file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from nodegraph.folders import InvalidNameError, PathEscapeError, safe_join
from nodegraph.server.frontend import DEFAULT_SETTINGS
from nodegraph.server.replies import error, flag, read_body, read_json
from nodegraph.server.routes_files import served_headers
from nodegraph.server.state import state

routes = web.RouteTableDef()
USER = "default"
SETTINGS_FILE = "comfy.settings.json"
_settings_lock = threading.Lock()


def user_root(request: web.Request) -> Path:
    return Path(state(request).engine.env.folders.user_dir) / USER


def _user_path(request: web.Request, name: str) -> Path:
    """`name` under the user's folder; raises PathEscapeError."""
    root = user_root(request)
    root.mkdir(parents=True, exist_ok=True)
    path = safe_join(root, name)
    if path.is_symlink():
        raise PathEscapeError(f"{name!r} is a symbolic link")
    return path


# ------------------------------------------------------------------------------------ settings


def _read_settings(root: Path) -> dict[str, Any]:
    defaults = dict(DEFAULT_SETTINGS)
    try:
        stored = json.loads((root / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        stored = {}
    return defaults | (stored if isinstance(stored, dict) else {})


def _update_settings(root: Path, changes: dict[str, Any]) -> None:
    with _settings_lock:
        path = root / SETTINGS_FILE
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            stored = {}
        stored = (stored if isinstance(stored, dict) else {}) | changes
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=4), encoding="utf-8")
        os.replace(tmp, path)  # never a half-written settings file


@routes.get("/settings")
async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(_read_settings, user_root(request)))


@routes.get("/settings/{id}")
async def get_setting(request: web.Request) -> web.Response:
    settings = await asyncio.to_thread(_read_settings, user_root(request))
    return web.json_response(settings.get(request.match_info["id"]))


@routes.post("/settings")
async def post_settings(request: web.Request) -> web.Response:
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return error(400, "invalid_request", "settings must be a JSON object")
    await asyncio.to_thread(_update_settings, user_root(request), body)
    return web.Response(status=200)


@routes.post("/settings/{id}")
async def post_setting(request: web.Request) -> web.Response:
    value = await read_json(request)
    await asyncio.to_thread(_update_settings, user_root(request), {request.match_info["id"]: value})
    return web.Response(status=200)


@routes.get("/users")
async def users(request: web.Request) -> web.Response:
    return web.json_response({"storage": "server", "migrated": True})


# ------------------------------------------------------------------------------------ userdata


def _info(path: Path, root: Path) -> dict[str, Any]:
    st = path.stat()
    return {
        "path": path.relative_to(root).as_posix(),
        "size": st.st_size,
        "modified": st.st_mtime,
        "created": st.st_ctime,
    }


@routes.get("/userdata")
async def list_userdata(request: web.Request) -> web.Response:
    """Files under `dir` (relative to it): names, `full_info` dicts, or `split` path lists."""
    directory = request.query.get("dir", "")
    try:
        folder = _user_path(request, directory)
    except PathEscapeError as exc:
        return error(403, "path_escape", "that folder is outside your user folder", str(exc))
    if not folder.is_dir():
        return error(404, "not_found", f"no folder {directory!r} in the user folder")
    recurse, full, split = (flag(request.query.get(k)) for k in ("recurse", "full_info", "split"))

    def listing() -> list[Any]:
        found = sorted(
            p
            for p in (folder.rglob("*") if recurse else folder.iterdir())
            if p.is_file() and not p.is_symlink()
        )
        if full:
            return [_info(p, folder) for p in found]
        rel = [p.relative_to(folder).as_posix() for p in found]
        return [[r, *r.split("/")] for r in rel] if split else rel

    return web.json_response(await asyncio.to_thread(listing))


@routes.get("/v2/userdata")
async def list_userdata_v2(request: web.Request) -> web.Response:
    path = request.query.get("path", "")
    try:
        folder = _user_path(request, path) if path.strip("/") else user_root(request)
    except PathEscapeError as exc:
        return error(403, "path_escape", "that folder is outside your user folder", str(exc))
    if not folder.is_dir():
        return error(404, "not_found", f"no folder {path!r} in the user folder")
    root = user_root(request)
    entries = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            continue
        entry: dict[str, Any] = {
            "name": p.name,
            "path": p.relative_to(root).as_posix(),
            "type": "directory" if p.is_dir() else "file",
        }
        if p.is_file():
            entry.update(size=p.stat().st_size, modified=p.stat().st_mtime)
        entries.append(entry)
    return web.json_response(entries)


def _file_or_error(request: web.Request, key: str = "file") -> Path | web.Response:
    name = request.match_info[key]
    try:
        return _user_path(request, name)
    except PathEscapeError as exc:
        if isinstance(exc, InvalidNameError) or "\x00" in name:
            return error(400, "invalid_filename", "that file name is not allowed", str(exc))
        return error(403, "path_escape", "that file is outside your user folder", str(exc))


@routes.get("/userdata/{file}")
async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _file_or_error(request)
    if isinstance(path, web.Response):
        return path
    if not path.is_file():
        return error(404, "not_found", f"no file {request.match_info['file']!r} in the user folder")
    return web.FileResponse(path, headers=served_headers(path.name))


@routes.post("/userdata/{file}")
async def post_userdata(request: web.Request) -> web.Response:
    """Write the raw body to the file; `overwrite=false` refuses an existing one (409)."""
    path = _file_or_error(request)
    if isinstance(path, web.Response):
        return path
    if path.exists() and not flag(request.query.get("overwrite"), default=True):
        return error(
            409, "exists", f"{request.match_info['file']!r} exists; pass overwrite=true to replace it"
        )
    if path.is_dir():
        return error(409, "is_a_folder", f"{request.match_info['file']!r} is a folder in the user folder")
    data = await read_body(request, state(request).max_upload_size)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{uuid.uuid4().hex}.partial")
        try:  # never a half-written file where the old one was (a full disk stops mid-write)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    await asyncio.to_thread(write)
    root = user_root(request)
    if flag(request.query.get("full_info")):
        return web.json_response(_info(path, root))
    return web.json_response(path.relative_to(root).as_posix())


@routes.delete("/userdata/{file}")
async def delete_userdata(request: web.Request) -> web.Response:
    path = _file_or_error(request)
    if isinstance(path, web.Response):
        return path
    if not path.is_file():
        return error(404, "not_found", f"no file {request.match_info['file']!r} in the user folder")
    await asyncio.to_thread(path.unlink)
    return web.Response(status=204)


@routes.post("/userdata/{file}/move/{dest}")
async def move_userdata(request: web.Request) -> web.Response:
    source = _file_or_error(request)
    if isinstance(source, web.Response):
        return source
    dest = _file_or_error(request, "dest")
    if isinstance(dest, web.Response):
        return dest
    if not source.is_file():
        return error(404, "not_found", f"no file {request.match_info['file']!r} in the user folder")
    if dest.is_dir():  # shutil.move would move the file into it and answer the folder's name
        return error(409, "is_a_folder", f"{request.match_info['dest']!r} is a folder in the user folder")
    if dest.exists() and not flag(request.query.get("overwrite"), default=True):
        return error(
            409, "exists", f"{request.match_info['dest']!r} exists; pass overwrite=true to replace it"
        )

    def move() -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, dest)

    await asyncio.to_thread(move)
    root = user_root(request)
    if flag(request.query.get("full_info")):
        return web.json_response(_info(dest, root))
    return web.json_response(dest.relative_to(root).as_posix())
