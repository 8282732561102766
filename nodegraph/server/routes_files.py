"""Files in and out: `/view`, `/upload/image`, `/upload/mask`.

Every name from a request goes through `folders.safe_join`, which refuses absolute paths, `..`,
NUL and symlinks that lead out of the folder; aiohttp has already decoded `%2e%2e` into `..` by
the time a handler sees it, so encoded forms meet the same checks.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import mimetypes
import os
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, MultipartReader, web

from nodegraph.folders import DATA_FOLDERS, InvalidNameError, PathEscapeError, safe_join
from nodegraph.images import ImageBudgetError, open_checked
from nodegraph.server.replies import BadRequest, error, flag, storage_error, too_large
from nodegraph.server.state import state

routes = web.RouteTableDef()
# Types a browser shows without running anything: served inline. Everything else (SVG, HTML,
# XHTML, XML, XSL, JS, PDF, unknown) goes out as an attachment of its own type or as bytes, so a
# planted file can never run script in this server's origin with the user's cookie (D6).
INLINE_TYPES = frozenset(
    {
        "image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/avif",
        "image/x-ms-bmp", "image/tiff", "video/mp4", "video/webm", "video/quicktime", "audio/mpeg",
        "audio/wav", "audio/x-wav", "audio/ogg", "audio/flac", "audio/x-flac", "audio/webm",
        "application/json", "text/plain", "text/css", "text/csv", "model/gltf-binary",
    }
)  # fmt: skip
_ACTIVE = ("html", "xml", "svg", "javascript", "ecmascript", "xsl")


_MIME = re.compile(r"[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*")


def served_headers(name: str, declared: str | None = None) -> dict[str, str]:
    """Content-Type and Content-Disposition for serving a stored file called `name` (of the type a
    client `declared` when it stored it, if any: it gets the same rules as a type from the name)."""
    mime = (declared or "").split(";", 1)[0].strip().lower() or mimetypes.guess_type(name)[0] or ""
    if not _MIME.fullmatch(mime):
        mime = "application/octet-stream"
    plain = "".join(c for c in name if " " <= c < "\x7f" and c not in '"\\')
    names = f"filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='', errors='replace')}"
    if mime in INLINE_TYPES:
        return {"Content-Type": mime, "Content-Disposition": f"inline; {names}"}
    if any(word in mime for word in _ACTIVE):
        mime = "application/octet-stream"  # not even a download may be opened as a page
    return {"Content-Type": mime, "Content-Disposition": f"attachment; {names}"}


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
    except InvalidNameError as exc:
        return error(400, "invalid_filename", "that file name is not allowed", str(exc))
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
        except (OSError, ValueError, SyntaxError) as exc:  # ImageBudgetError is a ValueError
            return error(415, "not_an_image", f"{found.name} cannot be re-encoded", str(exc))
        name = os.path.splitext(found.name)[0] + "." + mime.split("/")[1]
        return web.Response(body=data, headers=served_headers(name))
    return web.FileResponse(found, headers=served_headers(found.name))


def _reencode(path: Path, preview: str | None, channel: str) -> tuple[bytes, str]:
    from PIL import Image

    with open_checked(path, path.name, frames=False) as opened:
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
    """The multipart fields, read to the end: text values as str, the image as (filename, bytes).

    Bounded in total (not only per part: eight 90 MB text parts once took 720 MB, D8); a body that
    is not well-formed multipart is a 400 naming what is wrong.
    """
    if not request.content_type.startswith("multipart/"):
        raise BadRequest(error(400, "no_file", "send the image as multipart/form-data with a field 'image'"))
    limit = state(request).max_upload_size
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(too_large(limit))
    try:
        return await _read_parts(await request.multipart(), limit)
    except (ValueError, AssertionError, LookupError, TypeError) as exc:
        # aiohttp's multipart reader signals a missing boundary, a cut body or bad headers this way
        raise BadRequest(
            error(400, "malformed_multipart", "the body is not valid multipart/form-data", str(exc))
        ) from exc


async def _read_parts(reader: MultipartReader, limit: int) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    total = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ValueError("nested multipart bodies are not accepted")
        data = bytearray()
        while chunk := await part.read_chunk():
            data += chunk
            total += len(chunk)
            if total > limit:  # a chunked body has no Content-Length to refuse up front
                raise BadRequest(too_large(limit))
        if part.name is None or part.name in fields:
            continue  # nameless parts are skipped; the first of repeated names counts
        fields[part.name] = (
            (part.filename, bytes(data)) if part.filename is not None else data.decode("utf-8", "replace")
        )
    return fields


def text_field(fields: dict[str, Any], name: str) -> str:
    """A text field's value ("" when absent); a file sent under a text field's name is a 400."""
    value = fields.get(name)
    if isinstance(value, tuple):
        raise BadRequest(error(400, "invalid_field", f"field {name!r} must be text, not a file"))
    return str(value or "")


def _target(request: web.Request, fields: dict[str, Any]) -> tuple[Path, str, str, str, bytes] | web.Response:
    """(path, name, subfolder, type, data) for an upload, or the refusing response."""
    image = fields.get("image")
    if not isinstance(image, tuple) or not image[0]:
        return error(400, "no_file", "send the image as a multipart field 'image' with a file name")
    filename, data = image
    kind = text_field(fields, "type") or "input"
    subfolder = text_field(fields, "subfolder")
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


def _budget_problem(data: bytes, filename: str) -> str | None:
    """Why an uploaded image is over the pixel budget, from its header; None if it is not (or is
    not an image Pillow knows: ComfyUI stores any file)."""
    try:
        with open_checked(io.BytesIO(data), filename):
            return None
    except ImageBudgetError as exc:
        return str(exc)
    except (OSError, ValueError, SyntaxError):
        return None


def _store(path: Path, data: bytes, overwrite: bool) -> Path:
    """Write `data`; without overwrite an existing different file gets ' (i)' before the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "the upload's name is a folder", path.name)
    if not overwrite:
        stem, ext = os.path.splitext(path.name)
        i = 1
        while path.exists():
            if hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest():
                return path
            path = path.with_name(f"{stem} ({i}){ext}")
            i += 1
    partial = path.with_name(f".{uuid.uuid4().hex}.partial")
    try:  # never a half-written upload under the real name (a full disk stops mid-write)
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


@routes.post("/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    """Save an uploaded image into input (or temp/output); answers `{name, subfolder, type}`."""
    fields = await _upload_fields(request)
    target = _target(request, fields)
    if isinstance(target, web.Response):
        return target
    path, filename, subfolder, kind, data = target
    problem = await asyncio.to_thread(_budget_problem, data, filename)
    if problem is not None:
        return error(413, "image_too_large", problem)
    saved = await asyncio.to_thread(_store, path, data, flag(text_field(fields, "overwrite")))
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
        ref = json.loads(text_field(fields, "original_ref"))
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
        saved = await asyncio.to_thread(
            _merge_mask, original, data, path, flag(text_field(fields, "overwrite"))
        )
    except ImageBudgetError as exc:
        return error(400, "invalid_mask", str(exc))
    except (OSError, ValueError, SyntaxError) as exc:
        if storage_error(exc, "upload") is not None:
            raise
        return error(400, "not_an_image", "the mask or the original is not an image", str(exc))
    return web.json_response({"name": saved.name, "subfolder": subfolder, "type": kind})


def _merge_mask(original: Path, mask_bytes: bytes, path: Path, overwrite: bool) -> Path:
    from PIL.PngImagePlugin import PngInfo

    with open_checked(original, original.name, frames=False) as img:
        info = PngInfo()
        for key, value in getattr(img, "text", {}).items():
            info.add_text(key, value)
        rgba = img.convert("RGBA")
    with open_checked(io.BytesIO(mask_bytes), "the mask", frames=False) as mask:
        if mask.size != rgba.size:
            raise ImageBudgetError(
                f"the mask is {mask.size[0]}x{mask.size[1]} pixels but {original.name} is "
                f"{rgba.size[0]}x{rgba.size[1]}; draw the mask on the same image"
            )
        rgba.putalpha(mask.convert("RGBA").getchannel("A"))
    out = io.BytesIO()
    rgba.save(out, format="PNG", compress_level=4, pnginfo=info)
    return _store(path, out.getvalue(), overwrite)
