"""Small helpers every route uses: JSON bodies with a size limit, and errors in ComfyUI's shape."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from aiohttp import web

from nodegraph.server.state import MAX_JSON_SIZE, state


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


async def read_json(request: web.Request, *, default: Any = None) -> Any:
    """The request's JSON body; an empty body gives `default`. Raises BadRequest (400/413)."""
    limit = min(MAX_JSON_SIZE, state(request).max_upload_size)
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(error(413, "request_too_large", f"request body over {limit} bytes"))
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise BadRequest(error(413, "request_too_large", f"request body over {limit} bytes"))
    if not raw.strip():
        return default
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        response = error(400, "invalid_json", "the request body is not valid JSON", str(exc), node_errors={})
        raise BadRequest(response) from exc


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
