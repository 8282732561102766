"""Small helpers every route uses: JSON bodies with a size limit, and errors in ComfyUI's shape."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import math
import sqlite3
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from nodegraph.server.state import MAX_JSON_DEPTH, MAX_JSON_SIZE, state


def error(status: int, kind: str, message: str, details: str = "", **extra: Any) -> web.Response:
    """`{"error": {type, message, details, extra_info}}`, plus any extra top-level keys."""
    body: dict[str, Any] = {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}}
    body.update(extra)
    return web.json_response(jsonable(body), status=status)


class BadRequest(Exception):
    """Raised by `read_json`; carries the ready response."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, up to `limit` bytes. Raises BadRequest (400 undecodable, 413 too large).

    Reads until the end of the body, however it arrives (Content-Length or chunked, in one segment
    or many slow ones): `content.read(n)` alone returns what is buffered so far, which truncated
    bodies that crossed a real network (D1).
    """
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(too_large(limit))
    data = bytearray()
    try:
        while chunk := await request.content.readany():
            data += chunk
            if len(data) > limit:  # a chunked or compressed body has no Content-Length to refuse up front
                raise BadRequest(too_large(limit))
    except (HttpProcessingError, RequestPayloadError) as exc:  # bad gzip, unknown encoding, framing
        raise BadRequest(undecodable(exc)) from exc
    return bytes(data)


def too_large(limit: int) -> web.Response:
    return error(413, "request_too_large", f"request body over {limit} bytes", "send a smaller body")


def undecodable(exc: Exception) -> web.Response:
    message = getattr(exc, "message", None) or str(exc)
    response = error(
        400,
        "undecodable_body",
        f"the request body cannot be decoded: {message}",
        "send it plain or with Content-Encoding gzip or deflate",
        node_errors={},
    )
    response.force_close()  # the rest of the body cannot be read either: no keep-alive after it
    return response


JSON_ON_LOOP = 64 * 1024  # bodies up to this size are parsed on the event loop (well under 1 ms)


def json_problem(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Why a parsed JSON value cannot be used, or None: nesting deeper than `limit`, a lone UTF-16
    surrogate (`"\\ud800"` is valid JSON but no UTF-8 text, file name or database can hold it), or
    a non-finite number (`NaN`, `Infinity`, `1e999`: Python reads them, but JSON has none, so once
    stored and sent back in `/queue`, `/history` or `/settings` the canvas cannot parse the answer).
    Names where the value is. Iterative: a deep value must not recurse here."""
    # paths are linked (key, parent) pairs, made into text only for the answer
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return f"holds a lone UTF-16 surrogate (\\ud800-\\udfff){_where(path)}, which is not text"
        elif isinstance(item, float):
            if not math.isfinite(item):
                shown = "NaN" if math.isnan(item) else "Infinity" if item > 0 else "-Infinity"
                return f"holds {shown}{_where(path)}: JSON has no such number; send a finite one"
        elif isinstance(item, (dict, list)):
            if depth > limit:
                return f"nests deeper than {limit} levels"
            if isinstance(item, dict):
                stack.extend((k, depth, (k, path)) for k in item)
                stack.extend((v, depth + 1, (k, path)) for k, v in item.items())
            else:
                stack.extend((v, depth + 1, (i, path)) for i, v in enumerate(item))
    return None


def _where(path: Any) -> str:
    keys: list[str] = []
    while path is not None:
        key, path = path
        keys.append(f"[{key}]" if isinstance(key, int) else ("." if path is not None else "") + str(key))
    if not keys:
        return ""
    text = "".join(reversed(keys))
    return f" at {text[:200].encode('utf-8', 'backslashreplace').decode('utf-8')}"


def parse_json(raw: bytes, what: str = "the request body") -> Any:
    """JSON from bytes, nesting at most MAX_JSON_DEPTH; raises BadRequest with a 400 that says why."""
    try:
        value = json.loads(raw)
    except RecursionError as exc:
        raise BadRequest(_refused(what, f"nests deeper than {MAX_JSON_DEPTH} levels")) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        response = error(400, "invalid_json", f"{what} is not valid JSON", str(exc), node_errors={})
        raise BadRequest(response) from exc
    problem = json_problem(value)
    if problem is not None:
        raise BadRequest(_refused(what, problem))
    return value


def _refused(what: str, problem: str) -> web.Response:
    return error(400, "invalid_json", f"{what} {problem}", "", node_errors={})


async def read_json(request: web.Request, *, default: Any = None) -> Any:
    """The request's whole JSON body; an empty body gives `default`. Raises BadRequest (400/413)."""
    raw = await read_body(request, min(MAX_JSON_SIZE, state(request).max_upload_size))
    if not raw.strip():
        return default
    if len(raw) > JSON_ON_LOOP:  # a canvas workflow of megabytes: seconds of parsing and checking
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


_STORAGE = {
    errno.ENAMETOOLONG: (400, "name_too_long", "a file name is too long for the file system"),
    errno.EILSEQ: (400, "invalid_filename", "a file name has bytes the file system refuses"),
    errno.EISDIR: (409, "is_a_folder", "the target is a folder, not a file"),
    errno.ENOTDIR: (409, "not_a_folder", "a folder in the path is a file"),
    errno.EEXIST: (409, "exists", "the target already exists"),
    errno.ENOTEMPTY: (409, "exists", "the target is a folder that is not empty"),
    errno.EROFS: (403, "read_only", "the server's folder is read-only"),
    errno.EACCES: (403, "read_only", "the server may not write there (permissions)"),
    errno.EPERM: (403, "read_only", "the server may not write there (permissions)"),
    errno.ENOSPC: (507, "insufficient_storage", "the server's disk is full"),
    errno.EDQUOT: (507, "insufficient_storage", "the server's disk quota is used up"),
}


def storage_error(exc: BaseException, where: str) -> web.Response | None:
    """The 4xx/507 answer for a file-system fault on `where`, or None if it is not one we know.

    A full disk is the server's state, not a bug (507 Insufficient Storage); a name too long, a
    file where a folder should be, a read-only folder are the request's or the setup's (4xx).
    """
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "full" in text:
            return error(507, "insufficient_storage", "the server's disk is full (queue database)", str(exc))
        if "readonly" in text or "read-only" in text:
            return error(403, "read_only", "the queue database is read-only", str(exc))
        return None
    if not isinstance(exc, OSError) or exc.errno not in _STORAGE:
        return None
    status, kind, message = _STORAGE[exc.errno]
    return error(status, kind, f"{message} ({where})", exc.strerror or str(exc))


def jsonable(value: Any) -> Any:
    """Dataclasses (validation errors) and tuples into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def flag(value: str | None, default: bool = False) -> bool:
    """A query flag: true/1/yes/on."""
    if value is None:
        return default
    return value.strip().lower() in ("true", "1", "yes", "on")
