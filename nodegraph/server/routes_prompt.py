"""Queueing and following prompts: `/prompt`, `/queue`, `/history`, `/interrupt`, `/free`.

Beyond ComfyUI: `POST /prompt` also takes a UI-format workflow (converted here), `?wait=true`
answers only when the prompt has finished, with its outputs, and `POST /prompt/{id}/cancel`
removes a pending prompt or interrupts a running one.
"""

from __future__ import annotations

import asyncio
import math
import random
import sqlite3
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from nodegraph.memory_budget import memory_errors
from nodegraph.server.queue import QueueItem
from nodegraph.server.replies import BadRequest, error, flag, jsonable, read_json
from nodegraph.server.state import ServerState, state

routes = web.RouteTableDef()
DEFAULT_WAIT_S = 3600.0
MAX_QUERY_INT = 2**31 - 1  # SQLite takes 64-bit integers; larger ones were an OverflowError (500)
_IDS = random.Random()  # seeded from os.urandom once


def new_prompt_id() -> str:
    """A random (version 4) UUID. Not `uuid4()`: `os.urandom` lets go of the GIL, and taking it
    back while the worker thread computes cost the event loop a wait on every POST. Prompt ids
    name prompts, they are no secret (`/queue` lists them)."""
    return str(uuid.UUID(int=_IDS.getrandbits(128), version=4))


@routes.get("/prompt")
async def get_prompt(request: web.Request) -> web.Response:
    remaining = await asyncio.to_thread(state(request).store.remaining)
    return web.json_response({"exec_info": {"queue_remaining": remaining}})


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    """Validate and queue a prompt (API or UI format); `?wait=true` waits for its outputs."""
    st = state(request)
    body = await read_json(request)
    if not isinstance(body, dict) or body.get("prompt") is None:
        return error(400, "no_prompt", "No prompt provided", 'send {"prompt": {...}} as JSON', node_errors={})
    prompt_id = str(body.get("prompt_id") or new_prompt_id())
    extra_data = body.get("extra_data") or {}
    if not isinstance(extra_data, dict):
        return error(400, "invalid_prompt", "extra_data must be a JSON object", node_errors={})
    if "client_id" in body:
        extra_data["client_id"] = body["client_id"]
    source = request.headers.get("Comfy-Usage-Source", "")
    if "comfy_usage_source" not in extra_data and source and source.isascii() and source.isprintable():
        extra_data["comfy_usage_source"] = source  # a label: other bytes arrive as lone surrogates
    extra_data["create_time"] = int(time.time() * 1000)  # ComfyUI's job creation time, in ms
    number = _number(body)
    future: asyncio.Future[dict[str, Any]] | None = None
    if flag(request.query.get("wait")):  # registered before queueing, so a fast finish is not missed
        future = asyncio.get_running_loop().create_future()
        st.waiters.setdefault(prompt_id, []).append(future)
    # One trip to a thread for validation, the insert and the status broadcast: each trip costs
    # GIL hand-offs while the worker computes, which is what POST latency under load is made of.
    loop = asyncio.get_running_loop()
    accepted = await loop.run_in_executor(st.validator, _accept, st, body, extra_data, prompt_id, number)
    if isinstance(accepted, web.Response):
        if future is not None:
            st.waiters.get(prompt_id, []).remove(future)
        return accepted
    item, node_errors = accepted
    reply = {"prompt_id": prompt_id, "number": item.as_list()[0], "node_errors": jsonable(node_errors)}
    if future is None:
        return web.json_response(reply)
    return await _wait(request, future, reply)


def _accept(
    st: ServerState, body: dict[str, Any], extra_data: dict[str, Any], prompt_id: str, number: float | None
) -> tuple[QueueItem, Any] | web.Response:
    """Validate and queue; the queued item and node errors, or the 400 response."""
    if st.max_queue is not None and st.store.remaining() >= st.max_queue:
        return error(
            429,
            "queue_full",
            f"the queue holds {st.max_queue} prompts, the server's limit (--max-queue-size)",
            "wait for some to finish, then queue again",
            node_errors={},
        )
    checked = _validate(st, body, extra_data)
    if isinstance(checked, web.Response):
        return checked
    prompt, outputs, node_errors = checked
    try:
        item = st.store.put(
            prompt_id, prompt, extra_data, outputs, number=number, front=bool(body.get("front"))
        )
    except sqlite3.IntegrityError:
        return error(400, "duplicate_prompt_id", f"prompt {prompt_id} is already queued", node_errors={})
    # Here, not on the event loop: counting the queue waits for the store's lock, which the
    # worker holds while it files a finished prompt.
    st.worker.broadcast_status()
    return item, node_errors


def _number(body: dict[str, Any]) -> float | None:
    """The optional queue position; finite only (an Infinity once broke every client's JSON.parse)."""
    raw = body.get("number")
    if raw is None:
        return None
    try:
        number = float(raw)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(
            error(400, "invalid_prompt", "number must be a number", str(exc), node_errors={})
        ) from exc
    if not math.isfinite(number):
        raise BadRequest(
            error(400, "invalid_prompt", f"number must be finite, not {raw!r}", "", node_errors={})
        )
    return number


def _validate(st: ServerState, body: dict[str, Any], extra_data: dict[str, Any]) -> Any:
    """(prompt, outputs, node_errors) or a 400 response. Runs on a thread: validation reads folders."""
    from nodegraph.graph import load_workflow
    from nodegraph.validate import validate_prompt

    engine = st.engine
    if not isinstance(body["prompt"], dict):
        # load_workflow also takes file paths and text: from a request that would read server files.
        return error(
            400, "invalid_prompt", "prompt must be a JSON object (API or UI workflow)", node_errors={}
        )
    try:
        loaded = load_workflow(body["prompt"], engine.registry)
    except Exception as exc:  # malformed workflow: a clear 400, never a traceback
        return error(
            400, "invalid_prompt", f"Cannot read the prompt: {exc}", type(exc).__name__, node_errors={}
        )
    if loaded.workflow is not None:
        pnginfo = extra_data.setdefault("extra_pnginfo", {})
        if isinstance(pnginfo, dict):
            pnginfo.setdefault("workflow", loaded.workflow)
    targets = body.get("partial_execution_targets")
    try:
        result = validate_prompt(loaded.prompt, engine.registry, engine.env, partial_targets=targets)
    except Exception as exc:
        return error(
            400, "invalid_prompt", f"Cannot validate the prompt: {exc}", type(exc).__name__, node_errors={}
        )
    if not result.ok:
        body_err = jsonable(result.error) or {
            "type": "invalid_prompt",
            "message": "Prompt is invalid",
            "details": "",
            "extra_info": {},
        }
        return web.json_response({"error": body_err, "node_errors": jsonable(result.node_errors)}, status=400)
    too_big = memory_errors(result.prompt, engine.registry)
    if too_big:
        first = next(iter(too_big.values()))["errors"][0]["message"]
        err = {"type": "prompt_outputs_failed_validation", "message": first, "details": "", "extra_info": {}}
        return web.json_response({"error": err, "node_errors": too_big}, status=400)
    return result.prompt, [str(o) for o in result.outputs], result.node_errors


async def _wait(
    request: web.Request, future: asyncio.Future[dict[str, Any]], reply: dict[str, Any]
) -> web.Response:
    try:
        timeout = float(request.query.get("timeout", DEFAULT_WAIT_S))
    except ValueError:
        timeout = DEFAULT_WAIT_S
    timeout = min(max(timeout, 0.0), DEFAULT_WAIT_S) if math.isfinite(timeout) else DEFAULT_WAIT_S
    try:
        entry = await asyncio.wait_for(asyncio.shield(future), timeout)
    except asyncio.TimeoutError:
        reply.update(status="timeout", outputs={}, images=[])
        return web.json_response(reply, status=202)
    status = entry.get("status", {}).get("status_str", "cancelled") if entry else "cancelled"
    outputs = entry.get("outputs", {}) if entry else {}
    reply.update(status=status, outputs=outputs, images=image_urls(outputs), history=entry)
    return web.json_response(reply)


def image_urls(outputs: dict[str, Any]) -> list[str]:
    """`/view` URLs of every image in a prompt's outputs."""
    urls = []
    for ui in outputs.values():
        for image in (ui or {}).get("images", []) if isinstance(ui, dict) else []:
            if isinstance(image, dict) and "filename" in image:
                query = {
                    "filename": image["filename"],
                    "subfolder": image.get("subfolder", ""),
                    "type": image.get("type", "output"),
                }
                urls.append("/view?" + urlencode(query))
    return urls


@routes.post("/prompt/{prompt_id}/cancel")
async def cancel_prompt(request: web.Request) -> web.Response:
    """Remove a pending prompt or interrupt a running one; 404 for one that is neither."""
    st = state(request)
    prompt_id = request.match_info["prompt_id"]
    if await asyncio.to_thread(st.store.delete_pending, [prompt_id]):
        st.resolve_waiters(prompt_id, {})
        st.worker.broadcast_status()
        return web.json_response({"prompt_id": prompt_id, "cancelled": "pending"})
    if st.worker.interrupt(prompt_id):
        return web.json_response({"prompt_id": prompt_id, "cancelled": "running"})
    return error(404, "not_queued", f"prompt {prompt_id} is neither pending nor running")


@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    store = state(request).store
    running = await asyncio.to_thread(store.running)
    pending = await asyncio.to_thread(store.pending)
    return web.json_response(
        {"queue_running": [i.as_list() for i in running], "queue_pending": [i.as_list() for i in pending]}
    )


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    st = state(request)
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return error(400, "invalid_request", 'expected {"clear": true} or {"delete": [prompt ids]}')
    removed: list[str] = []
    if body.get("clear"):
        removed += await asyncio.to_thread(st.store.clear_pending)
    if isinstance(body.get("delete"), list):
        removed += await asyncio.to_thread(st.store.delete_pending, [str(i) for i in body["delete"]])
    for prompt_id in removed:
        st.resolve_waiters(prompt_id, {})
    st.worker.broadcast_status()
    return web.Response(status=200)


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    try:
        max_items = int(request.query["max_items"]) if "max_items" in request.query else None
        offset = int(request.query["offset"]) if "offset" in request.query else None
    except ValueError:
        return error(400, "invalid_request", "max_items and offset must be integers")
    if any(v is not None and not 0 <= v <= MAX_QUERY_INT for v in (max_items, offset)):
        return error(400, "invalid_request", f"max_items and offset must be between 0 and {MAX_QUERY_INT}")
    return web.json_response(await asyncio.to_thread(state(request).store.history, max_items, offset))


@routes.get("/history/{prompt_id}")
async def get_history_item(request: web.Request) -> web.Response:
    """`{prompt_id: entry}` once the prompt has finished; `{}` while it is queued or running, and for
    an unknown id. ComfyUI files a prompt in its history only when it is done, and clients poll this
    route until the id appears, then read its outputs; `GET /api/jobs/{id}` tells pending from running."""
    prompt_id = request.match_info["prompt_id"]
    entry = await asyncio.to_thread(state(request).store.history_entry, prompt_id)
    return web.json_response({} if entry is None else {prompt_id: entry})


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    store = state(request).store
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return error(400, "invalid_request", 'expected {"clear": true} or {"delete": [prompt ids]}')
    if body.get("clear"):
        await asyncio.to_thread(store.clear_history)
    if isinstance(body.get("delete"), list):
        await asyncio.to_thread(store.delete_history, [str(i) for i in body["delete"]])
    return web.Response(status=200)


@routes.post("/interrupt")
async def interrupt(request: web.Request) -> web.Response:
    """Interrupt the running prompt; with `{"prompt_id"}` only if that one is running."""
    body = await read_json(request, default={})
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    state(request).worker.interrupt(str(prompt_id) if prompt_id is not None else None)
    return web.Response(status=200)


@routes.post("/free")
async def free(request: web.Request) -> web.Response:
    body = await read_json(request, default={})
    if not isinstance(body, dict):
        return error(400, "invalid_request", 'expected {"unload_models": bool, "free_memory": bool}')
    state(request).worker.request_free(bool(body.get("unload_models")), bool(body.get("free_memory")))
    return web.Response(status=200)
