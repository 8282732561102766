"""Comfy API v2 (`/api/v2`), served natively on the same queue as `/prompt`: jobs, assets, health.

Shapes follow the v2 contract as Comfy's SDK (`comfy-sdk` on PyPI) and the reference proxy
(`comfy-api-proxy`) read and write them: a job is `{id, status, created_at, started_at,
completed_at, expires_at, queue_position, progress, outputs, error, outputs_reused, urls}`, with
statuses queued/running/succeeded/canceling/canceled/failed; errors are
`{"error": {"code", "message", "details"}}`. Submission is idempotent through the
`Idempotency-Key` header with Stripe's semantics (`v2_idempotency`: the same body replays the
first answer, another body is refused with 422; the keys are kept in the asset index's SQLite
file, so a restart does not forget them).
`workflow` is an API-format prompt whose `core/ASSET` references are replaced by the asset's
file name before validation. Events are Server-Sent Events built from polling the queue (the
poll answer is authoritative; the stream is a convenience, as the contract says).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

from aiohttp import web

from nodegraph.server.auth import host_header, is_loopback, parse_host
from nodegraph.server.replies import read_json
from nodegraph.server.routes_prompt import _accept
from nodegraph.server.state import ServerState, state
from nodegraph.server.v2_assets import AssetIndex
from nodegraph.server.v2_idempotency import answer_resend, request_hash
from nodegraph.server.v2_jobs import V1_TO_V2, job_body

routes = web.RouteTableDef()
MAX_KEY_LENGTH = 255
MAX_LIST = 500
EVENT_POLL_S = 0.25
HEARTBEAT_S = 15.0
TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})
V2_ASSETS: web.AppKey[AssetIndex] = web.AppKey("nodegraph_v2_assets", AssetIndex)


def v2_error(status: int, code: str, message: str, **details: Any) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "details": details or None}}, status=status
    )


def base_url(request: web.Request) -> str:
    """The origin of the absolute asset and output URLs (the v2 schema and comfy-sdk want absolute
    `uri`s there; job links are host-relative): the request's `Host` only when it names a loopback
    address (the only names a server without a token serves, and none a rebinding page can send),
    else the address the connection came in on. A `Host` is the client's to choose: echoed into the
    links we hand out, it would let whoever sets it (a proxy, a crafted request) point them at another
    server. Never `request.host`, which falls back to a DNS lookup on the event loop."""
    host = host_header(request)
    parsed = parse_host(host) if host is not None else None  # host_middleware refused a malformed one
    if parsed is not None and is_loopback(parsed[0]):
        name, port = parsed
    else:
        sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
        name, port = (str(sock[0]), int(sock[1])) if sock else ("127.0.0.1", None)
    if ":" in name:  # an IPv6 address
        name = f"[{name}]"
    return f"{request.scheme}://{name}" + (f":{port}" if port is not None else "")


def _resolve_assets(index: AssetIndex, node: Any, missing: list[str]) -> Any:
    """The workflow with each `core/ASSET` reference replaced by the name LoadImage reads."""
    if isinstance(node, dict) and node.get("__type") == "core/ASSET":
        info = node.get("info")
        record = None
        if isinstance(info, dict):
            record = index.get(str(info.get("id"))) if info.get("id") else None
            if record is None and isinstance(info.get("hash"), str):
                record = index.by_hash(info["hash"])
        if record is None:
            missing.append(str(info.get("id") if isinstance(info, dict) else "<no info>"))
            return node
        return record.name if record.folder == "input" else f"{record.name} [{record.folder}]"
    if isinstance(node, dict):
        return {k: _resolve_assets(index, v, missing) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_assets(index, v, missing) for v in node]
    return node


def _submit_error(body: dict[str, Any]) -> web.Response | None:
    """The 4xx answer for a submit body that cannot be queued, before anything is touched."""
    workflow = body.get("workflow")
    if not isinstance(workflow, dict):
        return v2_error(422, "invalid_workflow", "Missing 'workflow' (an API-format graph).")
    if isinstance(workflow.get("nodes"), list) and "links" in workflow:
        return v2_error(422, "workflow_format_ui", "This is a UI-export graph; export it in API format.")
    extra = body.get("extra_data")
    if extra is not None and (not isinstance(extra, dict) or set(extra) - {"api_key_comfy_org"}):
        return v2_error(400, "invalid_request", "'extra_data' accepts only the 'api_key_comfy_org' field.")
    labels = body.get("metadata")
    if labels is not None and not (
        isinstance(labels, dict) and len(labels) <= 16 and all(isinstance(v, str) for v in labels.values())
    ):
        return v2_error(422, "metadata_invalid", "'metadata' must map at most 16 keys to strings.")
    return None


@routes.post("/v2/jobs")
async def submit(request: web.Request) -> web.Response:
    """Queue an API-format workflow; 201 with the job. With an `Idempotency-Key`, a resend of the same
    body replays that answer and queues nothing (`v2_idempotency`)."""
    st, index = state(request), request.app[V2_ASSETS]
    body = await read_json(request)
    if not isinstance(body, dict):
        return v2_error(400, "invalid_request", "The body must be a JSON object.")
    key = request.headers.get("Idempotency-Key")
    job_id = str(uuid.uuid4())
    if key is None:
        return await _queue_job(request, st, index, body, job_id)
    # printable ASCII only: other bytes arrive as lone surrogates, which SQLite cannot store (a 500)
    if not key or len(key) > MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        return v2_error(
            400,
            "invalid_request",
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters.",
        )
    fingerprint = request_hash(body)
    # claimed in one SQLite statement, so two concurrent resends cannot both queue; kept on disk
    claim = await asyncio.to_thread(index.keys.claim, key, fingerprint, job_id)
    if claim is not None:
        base = base_url(request)

        def current(claimed_job: str) -> dict[str, Any] | None:
            return job_body(st, index, claimed_job, base)

        keys = index.keys
        answer = await asyncio.to_thread(answer_resend, keys, claim, fingerprint, job_id, current, v2_error)
        if answer is not None:  # replayed, refused, or still in flight; None: this request took it over
            return answer
    try:
        response = await _queue_job(request, st, index, body, job_id)
    except BaseException:
        await asyncio.to_thread(index.keys.release, key)
        raise
    if response.status == 201 and response.text is not None:
        await asyncio.to_thread(index.keys.record, key, response.status, response.text)
    else:  # nothing was queued: the same key may be used again
        await asyncio.to_thread(index.keys.release, key)
    return response


async def _queue_job(
    request: web.Request, st: ServerState, index: AssetIndex, body: dict[str, Any], job_id: str
) -> web.Response:
    """Validate and queue one submit body as job `job_id`: 201 with the job, or the v2 refusal."""
    refused = _submit_error(body)
    if refused is not None:
        return refused
    missing: list[str] = []
    workflow = await asyncio.to_thread(_resolve_assets, index, body["workflow"], missing)
    if missing:
        return v2_error(
            422,
            "missing_asset",
            f"Unresolvable core/ASSET reference(s): {', '.join(missing)}",
            missing_ids=missing,
        )
    extra: dict[str, Any] = dict(body.get("extra_data") or {})
    # Previews are made for the event stream; the client id is the job's, which no socket has, so
    # no websocket client gets frames it did not ask for.
    extra.update(client_id=job_id, create_time=int(time.time() * 1000), preview_method="auto")
    if body.get("metadata"):
        extra["v2_metadata"] = body["metadata"]
    loop = asyncio.get_running_loop()
    accepted = await loop.run_in_executor(
        st.validator, _accept, st, {"prompt": workflow}, extra, job_id, None
    )
    if isinstance(accepted, web.Response):
        return _as_v2_refusal(accepted)
    job = await asyncio.to_thread(job_body, st, index, job_id, base_url(request))
    return web.json_response(job, status=201)


def _as_v2_refusal(response: web.Response) -> web.Response:
    """`/prompt`'s 400/429 answer in v2's envelope."""
    try:
        data = json.loads(response.text or "{}")
    except ValueError:
        data = {}
    err = data.get("error") if isinstance(data.get("error"), dict) else {}
    message = str(err.get("message") or "Workflow rejected.")
    node_errors = data.get("node_errors") if isinstance(data.get("node_errors"), dict) else {}
    for node_id, found in node_errors.items():  # name the first bad node and input, as /prompt's body does
        first = (found.get("errors") or [{}])[0] if isinstance(found, dict) else {}
        detail = f"{first.get('message', '')}: {first.get('details', '')}".strip(": ")
        message += f"; node {node_id} ({found.get('class_type')}): {detail}"
        break
    if response.status == 429:
        refusal = v2_error(429, "queue_full", message)
        refusal.headers["Retry-After"] = "5"
        return refusal
    return v2_error(422, "invalid_workflow", message, node_errors=node_errors)


@routes.get("/v2/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    """Newest first: `{"jobs": [...]}`; `limit` (1-500), `status`, `metadata[key]=value` filters."""
    st, index = state(request), request.app[V2_ASSETS]
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        return v2_error(400, "invalid_request", "'limit' must be an integer.")
    if not 1 <= limit <= MAX_LIST:
        return v2_error(400, "invalid_request", f"'limit' must be between 1 and {MAX_LIST}.")
    wanted = {s.strip() for s in request.query.get("status", "").split(",") if s.strip()}
    bad = wanted - set(V1_TO_V2.values()) - {"canceling", "expired"}
    if bad:
        return v2_error(400, "invalid_request", f"Unknown status filter value(s): {', '.join(sorted(bad))}.")
    labels = {k[9:-1]: v for k, v in request.query.items() if k.startswith("metadata[") and k.endswith("]")}
    v1_statuses = [s for s, v2 in V1_TO_V2.items() if not wanted or v2 in wanted]
    from nodegraph.server.routes_jobs import list_jobs as v1_list

    base = base_url(request)

    def page() -> list[dict[str, Any]]:
        found, _ = v1_list(st, v1_statuses, None, "created_at", True, MAX_LIST if labels else limit, 0)
        bodies = [job_body(st, index, j["id"], base) for j in found]
        kept = [b for b in bodies if b and all(b.get("metadata", {}).get(k) == v for k, v in labels.items())]
        return kept[:limit]

    return web.json_response({"jobs": await asyncio.to_thread(page)})


@routes.get("/v2/jobs/{id}")
async def get_job(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    job = await asyncio.to_thread(job_body, state(request), request.app[V2_ASSETS], job_id, base_url(request))
    return web.json_response(job) if job else v2_error(404, "not_found", f"No job {job_id}.")


@routes.get("/v2/jobs/{id}/workflow")
async def get_workflow(request: web.Request) -> web.Response:
    st, job_id = state(request), request.match_info["id"]
    entry = await asyncio.to_thread(st.store.describe, job_id)
    queued = entry.get("prompt") if entry else None
    if not (isinstance(queued, list) and len(queued) == 5):
        return v2_error(404, "not_found", f"No workflow for job {job_id}.")
    return web.json_response({"workflow": queued[2], "format": "api"})


@routes.post("/v2/jobs/{id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    """Dequeue a queued job or interrupt a running one; a finished job is returned as it is."""
    st, index, job_id = state(request), request.app[V2_ASSETS], request.match_info["id"]
    base = base_url(request)
    job = await asyncio.to_thread(job_body, st, index, job_id, base)
    if job is None:
        return v2_error(404, "not_found", f"No job {job_id}.")
    if job["status"] == "queued" and await asyncio.to_thread(st.store.delete_pending, [job_id]):
        st.resolve_waiters(job_id, {})
        st.worker.broadcast_status()
        return web.json_response({**job, "status": "canceled", "queue_position": None})
    if job["status"] == "running" and st.worker.interrupt(job_id):
        return web.json_response({**job, "status": "canceling"})
    return web.json_response(job)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@routes.get("/v2/jobs/{id}/events")
async def events(request: web.Request) -> web.StreamResponse:
    """SSE: `status` on each change, `progress` and the latest `preview` (`{node_id, content_type,
    data_base64}`) while running, one `output` per output as soon as its node has shown it, and the
    final `status`, after which the stream ends. `: keepalive` comments keep idle proxies open."""
    st, index, job_id = state(request), request.app[V2_ASSETS], request.match_info["id"]
    base = base_url(request)
    job = await asyncio.to_thread(job_body, st, index, job_id, base)
    if job is None:
        return v2_error(404, "not_found", f"No job {job_id}.")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    last_status, last_progress, last_preview, beat = None, None, None, time.monotonic()
    sent: set[str] = set()  # the outputs already announced, by asset id
    while job is not None:
        status = job["status"]
        if status != last_status and status not in TERMINAL:
            await response.write(_sse("status", {"status": status, "queue_position": job["queue_position"]}))
        last_status = status
        if job["progress"] and job["progress"] != last_progress:
            last_progress = job["progress"]
            await response.write(_sse("progress", last_progress))
        worker = st.worker
        preview = worker.preview if worker.running_id == job_id else None
        if preview is not None and preview is not last_preview:
            last_preview = preview
            await response.write(
                _sse("preview", _preview_event(getattr(worker, "current_node", None), preview))
            )
        for output in job["outputs"]:  # each once its node has shown it, in the order they were shown
            if output["id"] not in sent:
                sent.add(output["id"])
                await response.write(_sse("output", output))
        if status in TERMINAL:
            await response.write(_sse("status", {"status": status, "queue_position": job["queue_position"]}))
            break
        if time.monotonic() - beat > HEARTBEAT_S:
            beat = time.monotonic()
            await response.write(b": keepalive\n\n")
        await asyncio.sleep(EVENT_POLL_S)
        job = await asyncio.to_thread(job_body, st, index, job_id, base)
    await response.write_eof()
    return response


def _preview_event(node_id: Any, preview: Any) -> dict[str, Any]:
    data = base64.b64encode(preview.data).decode()
    return {"node_id": str(node_id or ""), "content_type": preview.image_type, "data_base64": data}


@routes.get("/v2/health")
async def health(request: web.Request) -> web.Response:
    remaining = await asyncio.to_thread(state(request).store.remaining)
    return web.json_response({"status": "healthy", "queue_remaining": remaining})
