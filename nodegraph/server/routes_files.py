"""Files in and out: `/view`, `/upload/image`, `/upload/mask`.

Every name from a request goes through `folders.safe_join`, which refuses absolute paths, `..`,
NUL and symlinks that lead out of the folder; aiohttp has already decoded `%2e%2e` into `..` by
the time a handler sees it, so encoded forms meet the same checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import mimetypes
import os
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from nodegraph.folders import DATA_FOLDERS, PathEscapeError, safe_join
from nodegraph.server.replies import BadRequest, error, flag
from nodegraph.server.state import state

routes = web.RouteTableDef()
_UNSAFE_TYPES = ("text/html", "text/javascript", "application/javascript", "text/css")


def data_file(request: web.Request, filename: str, kind: str, subfolder: str) -> Path | web.Response:
    """The file under output/input/temp, or the 400/403/404 response that refuses it."""
    folders = state(request).engine.env.folders
    if not filename or filename.startswith("/") or ".." in filename or "\\" in filename or "\x00" in filename:
        return error(
            400, "invalid_filename", f"file name {filename!r} is not allowed", "give a plain file name"
        )
    if kind not in DATA_FOLDERS:
        return error(400, "invalid_type", f"type {kind!r} is not one of {', '.join(DATA_FOLDERS)}")
    base = Path(folders.data_dir(kind))
    try:
        folder = safe_join(base, subfolder) if subfolder else base
        path = safe_join(folder, os.path.basename(filename))
        if path.is_symlink() or (subfolder and folder.is_symlink()):
            raise PathEscapeError(f"{filename!r} is a symbolic link")
    except (PathEscapeError, ValueError) as exc:
        return error(403, "path_escape", "that path leaves its folder", str(exc))
    if not path.is_file():
        return error(404, "not_found", f"no file {filename!r} in {kind}/{subfolder}")
    return path


@routes.get("/view")
async def view(request: web.Request) -> web.StreamResponse:
    """A file from output/input/temp, maybe re-encoded (`preview=webp;90`) or one channel (`channel=a`)."""
    name = request.query.get("filename", "")
    kind = request.query.get("type", "output")
    for candidate in DATA_FOLDERS:  # ComfyUI's "name.png [output]" annotation overrides type
        if name.endswith(f" [{candidate}]"):
            name, kind = name[: -len(candidate) - 3], candidate
    found = data_file(request, name, kind, request.query.get("subfolder", ""))
    if isinstance(found, web.Response):
        return found
    preview = request.query.get("preview")
    channel = request.query.get("channel", "rgba")
    if preview or channel in ("rgb", "a"):
        try:
            data, mime = await asyncio.to_thread(_reencode, found, preview, channel)
        except (OSError, ValueError) as exc:
            return error(415, "not_an_image", f"{found.name} cannot be re-encoded", str(exc))
        return web.Response(body=data, content_type=mime, headers=_disposition(found.name))
    mime = mimetypes.guess_type(found.name)[0] or "application/octet-stream"
    if mime in _UNSAFE_TYPES:
        mime = "application/octet-stream"
    headers = {**_disposition(found.name), "Content-Type": mime}
    return web.FileResponse(found, headers=headers)


def _disposition(name: str) -> dict[str, str]:
    safe = name.replace('"', "").replace("\r", "").replace("\n", "")
    return {"Content-Disposition": f'filename="{safe}"'}


def _reencode(path: Path, preview: str | None, channel: str) -> tuple[bytes, str]:
    from PIL import Image

    with Image.open(path) as opened:
        img: Image.Image = opened
        if channel == "rgb":
            img = opened.convert("RGB")
        elif channel == "a":
            alpha = opened.getchannel("A") if "A" in opened.getbands() else Image.new("L", opened.size, 255)
            img = Image.new("RGBA", opened.size)
            img.putalpha(alpha)
        else:
            opened.load()
        out = io.BytesIO()
        if preview:
            fmt, _, quality = preview.partition(";")
            fmt = fmt.lower() if fmt.lower() in ("webp", "jpeg") else "webp"
            q = int(quality) if quality.isdigit() else 90
            img = img.convert("RGB") if fmt == "jpeg" else img
            img.save(out, format=fmt.upper(), quality=max(1, min(q, 100)))
            return out.getvalue(), f"image/{fmt}"
        img.save(out, format="PNG")
        return out.getvalue(), "image/png"


async def _upload_fields(request: web.Request) -> dict[str, Any]:
    """The multipart fields: text values as str, the image as (filename, bytes)."""
    fields: dict[str, Any] = {}
    if not request.content_type.startswith("multipart/"):
        raise BadRequest(error(400, "no_file", "send the image as multipart/form-data with a field 'image'"))
    reader = await request.multipart()
    limit = state(request).max_upload_size
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            continue
        data = bytearray()
        while chunk := await part.read_chunk():
            data += chunk
            if len(data) > limit:  # a chunked body has no Content-Length to refuse up front
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
        fields[part.name] = (
            (part.filename, bytes(data)) if part.filename is not None else data.decode("utf-8", "replace")
        )
    return fields


def _target(request: web.Request, fields: dict[str, Any]) -> tuple[Path, str, str, str, bytes] | web.Response:
    """(path, name, subfolder, type, data) for an upload, or the refusing response."""
    image = fields.get("image")
    if not isinstance(image, tuple) or not image[0]:
        return error(400, "no_file", "send the image as a multipart field 'image' with a file name")
    filename, data = image
    kind = str(fields.get("type") or "input")
    subfolder = str(fields.get("subfolder") or "")
    if kind not in DATA_FOLDERS:
        return error(400, "invalid_type", f"type {kind!r} is not one of {', '.join(DATA_FOLDERS)}")
    base = Path(state(request).engine.env.folders.data_dir(kind))
    try:
        if "/" in filename or "\\" in filename:
            raise PathEscapeError(f"file name {filename!r} has a folder in it; use subfolder")
        folder = safe_join(base, subfolder) if subfolder else base
        path = safe_join(folder, filename)
    except PathEscapeError as exc:
        return error(400, "path_escape", "the upload would leave its folder", str(exc))
    return path, filename, subfolder, kind, data


def _store(path: Path, data: bytes, overwrite: bool) -> Path:
    """Write `data`; without overwrite an existing different file gets ' (i)' before the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        stem, ext = os.path.splitext(path.name)
        i = 1
        while path.exists():
            if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
                return path
            path = path.with_name(f"{stem} ({i}){ext}")
            i += 1
    path.write_bytes(data)
    return path


@routes.post("/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    """Save an uploaded image into input (or temp/output); answers `{name, subfolder, type}`."""
    fields = await _upload_fields(request)
    target = _target(request, fields)
    if isinstance(target, web.Response):
        return target
    path, _, subfolder, kind, data = target
    saved = await asyncio.to_thread(_store, path, data, flag(fields.get("overwrite")))
    return web.json_response({"name": saved.name, "subfolder": subfolder, "type": kind})


@routes.post("/upload/mask")
async def upload_mask(request: web.Request) -> web.Response:
    """Put the uploaded image's alpha onto `original_ref`'s image and save it (ComfyUI's mask editor)."""
    fields = await _upload_fields(request)
    target = _target(request, fields)
    if isinstance(target, web.Response):
        return target
    path, _, subfolder, kind, data = target
    try:
        ref = json.loads(str(fields.get("original_ref") or ""))
        original = data_file(
            request, str(ref["filename"]), str(ref.get("type") or "input"), str(ref.get("subfolder") or "")
        )
    except (ValueError, KeyError, TypeError) as exc:
        return error(
            400, "invalid_original_ref", "original_ref must be JSON {filename, type?, subfolder?}", str(exc)
        )
    if isinstance(original, web.Response):
        return original
    try:
        saved = await asyncio.to_thread(_merge_mask, original, data, path, flag(fields.get("overwrite")))
    except OSError as exc:
        return error(400, "not_an_image", "the mask or the original is not an image", str(exc))
    return web.json_response({"name": saved.name, "subfolder": subfolder, "type": kind})


def _merge_mask(original: Path, mask_bytes: bytes, path: Path, overwrite: bool) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    with Image.open(original) as img:
        info = PngInfo()
        for key, value in getattr(img, "text", {}).items():
            info.add_text(key, value)
        rgba = img.convert("RGBA")
    with Image.open(io.BytesIO(mask_bytes)) as mask:
        rgba.putalpha(mask.convert("RGBA").getchannel("A"))
    out = io.BytesIO()
    rgba.save(out, format="PNG", compress_level=4, pnginfo=info)
    return _store(path, out.getvalue(), overwrite)
