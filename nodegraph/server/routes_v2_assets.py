"""Comfy API v2 asset routes (`/api/v2/assets`): upload, dedup by blake3 hash, metadata, content.

`POST /api/v2/assets` takes multipart fields `file`, `file_path`, `content_type`, optional
`expected_hash` (a mismatch is 409 `hash_mismatch`) and `tags`; bytes the server already holds
answer 200 with the existing record (`created_new: false`), new bytes 201. Records are described
in `v2_assets.py`.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from aiohttp import BodyPartReader, web

from nodegraph.folders import PathEscapeError, safe_join
from nodegraph.server.replies import read_json
from nodegraph.server.routes_files import served_headers
from nodegraph.server.routes_v2 import V2_ASSETS, base_url, v2_error
from nodegraph.server.state import state
from nodegraph.server.v2_assets import (
    CHUNK,
    AssetIndex,
    MissingHasher,
    clean_upload_path,
    content_type_of,
    new_digest,
)
from nodegraph.server.v2_jobs import asset_json

routes = web.RouteTableDef()


async def _receive(request: web.Request, index: AssetIndex, limit: int) -> web.Response:
    """Stream the multipart body: the file into a `.partial` in the input folder, hashed on the way."""
    try:
        digest = new_digest()
    except MissingHasher as exc:
        return v2_error(503, "hasher_missing", str(exc))
    fields: dict[str, str] = {}
    size, partial = 0, None
    part_type = "application/octet-stream"
    try:
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    continue
                if part.name != "file":
                    text = await _text_part(part, size, limit)
                    size += len(text)
                    fields.setdefault(part.name, text.strip())
                    continue
                if partial is not None:
                    return v2_error(422, "invalid_request", "Send one 'file' part.")
                part_type = part.headers.get("Content-Type", part_type)
                partial = index.roots["input"] / f".v2-upload-{uuid.uuid4().hex}.partial"
                partial.parent.mkdir(parents=True, exist_ok=True)
                with partial.open("wb") as out:
                    while chunk := await part.read_chunk(CHUNK):
                        size += len(chunk)
                        if size > limit:  # every part counts: the body is bounded in total
                            return _too_large(limit)
                        digest.update(chunk)
                        out.write(chunk)
        except _Refused as exc:
            return exc.response
        except (ValueError, AssertionError, LookupError, TypeError) as exc:
            # aiohttp's multipart reader signals a missing boundary, a cut body or bad headers this way
            return v2_error(400, "malformed_multipart", f"The body is not valid multipart/form-data: {exc}")
        if partial is None:
            return v2_error(422, "invalid_request", "Missing the 'file' part.")
        if not fields.get("file_path"):
            return v2_error(
                422,
                "invalid_request",
                "Missing the 'file_path' field (where in the input folder the file goes).",
            )
        try:
            wanted = clean_upload_path(fields["file_path"])
            safe_join(index.roots["input"], wanted)  # a name the file system can hold: length, depth
        except ValueError as exc:  # PathEscapeError and InvalidNameError are ValueErrors
            return v2_error(422, "invalid_request", str(exc))
        hash_ = "blake3:" + digest.hexdigest()
        expected = fields.get("expected_hash")
        if expected and expected.lower() != hash_:
            return v2_error(409, "hash_mismatch", "The declared hash does not match the received bytes.")
        base = base_url(request)
        existing = await asyncio.to_thread(index.by_hash, hash_)
        if existing is not None:
            return web.json_response(asset_json(existing, base, created_new=False), status=200)
        content_type = fields.get("content_type") or part_type or content_type_of(wanted)
        try:
            record = await asyncio.to_thread(index.place_upload, partial, wanted, hash_, size, content_type)
        except PathEscapeError as exc:  # a free name ("name_1.png") over the length limit
            return v2_error(422, "invalid_request", str(exc))
        return web.json_response(asset_json(record, base, created_new=True), status=201)
    finally:
        if partial is not None and partial.exists():
            os.unlink(partial)


MAX_FIELD = 64 * 1024  # a text field (file_path, content_type, expected_hash, tags)


class _Refused(Exception):
    def __init__(self, response: web.Response) -> None:
        super().__init__(response.text)
        self.response = response


def _too_large(limit: int) -> web.Response:
    return v2_error(413, "payload_too_large", f"the upload exceeds {limit} bytes")


async def _text_part(part: BodyPartReader, size: int, limit: int) -> str:
    """A text field, at most MAX_FIELD bytes and within what is left of the body's limit, as UTF-8."""
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data += chunk
        if len(data) > MAX_FIELD:
            raise _Refused(
                v2_error(422, "invalid_request", f"Field '{part.name}' is over {MAX_FIELD} bytes.")
            )
        if size + len(data) > limit:
            raise _Refused(_too_large(limit))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refused(v2_error(422, "invalid_request", f"Field '{part.name}' is not UTF-8 text.")) from exc
    if not text.isprintable() and any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        raise _Refused(v2_error(422, "invalid_request", f"Field '{part.name}' holds control characters."))
    return text


@routes.post("/v2/assets")
async def upload(request: web.Request) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        return v2_error(422, "invalid_request", "Expected multipart/form-data.")
    return await _receive(request, request.app[V2_ASSETS], state(request).max_upload_size)


@routes.post("/v2/assets/from-hash")
async def from_hash(request: web.Request) -> web.Response:
    body = await read_json(request)
    hash_ = body.get("hash") if isinstance(body, dict) else None
    if not isinstance(hash_, str):
        return v2_error(422, "invalid_request", "Missing 'hash'.")
    record = await asyncio.to_thread(request.app[V2_ASSETS].by_hash, hash_)
    if record is None:
        return v2_error(404, "blob_not_found", f"No asset has the bytes {hash_}.")
    return web.json_response(asset_json(record, base_url(request), created_new=False))


@routes.head("/v2/assets/by-hash/{hash}")
async def head_by_hash(request: web.Request) -> web.Response:
    found = await asyncio.to_thread(request.app[V2_ASSETS].by_hash, request.match_info["hash"])
    return web.Response(status=200 if found else 404)


@routes.get("/v2/assets/{id}")
async def get_asset(request: web.Request) -> web.Response:
    index = request.app[V2_ASSETS]
    record = await asyncio.to_thread(index.get, request.match_info["id"])
    if record is None:
        return v2_error(404, "not_found", f"No asset {request.match_info['id']}.")
    record = await asyncio.to_thread(index.with_hash, record)
    return web.json_response(asset_json(record, base_url(request)))


@routes.get("/v2/assets/{id}/content")
async def get_content(request: web.Request) -> web.StreamResponse:
    """The bytes (Range requests answered with 206 by aiohttp's file response)."""
    index = request.app[V2_ASSETS]
    record = await asyncio.to_thread(index.get, request.match_info["id"])
    if record is None:
        return v2_error(404, "not_found", f"No asset {request.match_info['id']}.")
    path: Path | None = index.path_of(record)
    if path is None or not path.is_file():
        return v2_error(404, "output_unavailable", f"The file of asset {record.id} is gone ({record.name}).")
    return web.FileResponse(path, headers=served_headers(path.name, record.content_type))


@routes.delete("/v2/assets/{id}")
async def delete_asset(request: web.Request) -> web.Response:
    """Forget the record; an uploaded file goes with it, a job's output file stays in the output folder."""
    index = request.app[V2_ASSETS]
    record = await asyncio.to_thread(index.get, request.match_info["id"])
    if record is None:
        return v2_error(404, "not_found", f"No asset {request.match_info['id']}.")
    await asyncio.to_thread(index.delete, record.id)
    path = index.path_of(record)
    if (
        record.folder == "input"
        and path is not None
        and await asyncio.to_thread(index.by_hash, record.hash or "") is None
    ):
        path.unlink(missing_ok=True)
    return web.Response(status=204)
