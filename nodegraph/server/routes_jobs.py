"""ComfyUI's jobs API (`/api/jobs`) over the SQLite queue and history, and the canvas's other
start-up routes: `/global_subgraphs`, `/node_replacements`, `/models/download`.

Payloads and errors follow ComfyUI's server.py: the list takes `status` (comma-separated),
`workflow_id`, `sort_by` (`created_at`, `execution_duration`), `sort_order`, `limit`, `offset`;
cancelling is idempotent (`{"cancelled": bool}`), a batch refuses non-canonical ids up front.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from nodegraph.server import jobs
from nodegraph.server.replies import BadRequest, read_json
from nodegraph.server.routes_prompt import MAX_QUERY_INT
from nodegraph.server.state import ServerState, state

routes = web.RouteTableDef()


def _refuse(message: str, status: int = 400, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _list_params(query: Any) -> tuple[list[str], str | None, str, bool, int | None, int] | web.Response:
    statuses = list(jobs.ALL_STATUSES)
    if query.get("status"):
        statuses = [s.strip().lower() for s in query["status"].split(",") if s.strip()]
        invalid = [s for s in statuses if s not in jobs.ALL_STATUSES]
        if invalid:
            valid = ", ".join(jobs.ALL_STATUSES)
            return _refuse(f"Invalid status value(s): {', '.join(invalid)}. Valid values: {valid}")
    sort_by = query.get("sort_by", "created_at").lower()
    if sort_by not in ("created_at", "execution_duration"):
        return _refuse("sort_by must be 'created_at' or 'execution_duration'")
    sort_order = query.get("sort_order", "desc").lower()
    if sort_order not in ("asc", "desc"):
        return _refuse("sort_order must be 'asc' or 'desc'")
    limit = None
    if "limit" in query:
        try:
            limit = int(query["limit"])
        except ValueError:
            return _refuse("limit must be an integer")
        if limit <= 0:
            return _refuse("limit must be a positive integer")
        if limit > MAX_QUERY_INT:
            return _refuse(f"limit must be at most {MAX_QUERY_INT}")
    try:
        offset = max(int(query.get("offset", 0)), 0)
    except ValueError:
        return _refuse("offset must be an integer")
    if offset > MAX_QUERY_INT:  # SQLite takes 64-bit integers: a bigger one was an OverflowError (500)
        return _refuse(f"offset must be at most {MAX_QUERY_INT}")
    return statuses, query.get("workflow_id") or None, sort_by, sort_order == "desc", limit, offset


def list_jobs(
    st: ServerState,
    statuses: list[str],
    workflow_id: str | None,
    sort_by: str,
    descending: bool,
    limit: int | None,
    offset: int,
) -> tuple[list[dict[str, Any]], int]:
    """One page of jobs and the total. Queued prompts are few; finished ones come sorted from an
    index, and only the page's records are read."""
    live: list[dict[str, Any]] = []
    if jobs.IN_PROGRESS in statuses:
        live += [jobs.queue_job(i.as_list(), jobs.IN_PROGRESS) for i in st.store.running()]
    if jobs.PENDING in statuses:
        live += [jobs.queue_job(i.as_list(), jobs.PENDING) for i in st.store.pending()]
    if workflow_id:
        live = [j for j in live if j.get("workflow_id") == workflow_id]
    finished = [s for s in statuses if s in jobs.HISTORY_STATUSES]
    total = len(live) + st.store.job_count(finished, workflow_id)
    wanted = None if limit is None else offset + limit
    keys = st.store.job_keys(finished, workflow_id, sort_by, descending, wanted)

    def key_of(job: dict[str, Any]) -> int:
        return jobs.duration(job) if sort_by == "execution_duration" else int(job.get("create_time") or 0)

    # Queued jobs first on equal keys, as ComfyUI's stable sort of [running, pending, history] gives.
    merged: list[tuple[int, int, str, dict[str, Any] | None]] = [
        (key_of(j), -1, j["id"], j) for j in live
    ] + [(k, seq, pid, None) for k, seq, pid in keys]
    merged.sort(key=lambda m: (-m[0] if descending else m[0], m[1]))
    page = merged[offset:] if wanted is None else merged[offset:wanted]
    stored = st.store.jobs([pid for _, _, pid, job in page if job is None])
    return [job if job is not None else stored[pid] for _, _, pid, job in page if job or pid in stored], total


@routes.get("/jobs")
async def get_jobs(request: web.Request) -> web.Response:
    """`GET /api/jobs`: `{"jobs": [...], "pagination": {offset, limit, total, has_more}}`."""
    params = _list_params(request.query)
    if isinstance(params, web.Response):
        return params
    statuses, workflow_id, sort_by, descending, limit, offset = params
    found, total = await asyncio.to_thread(
        list_jobs, state(request), statuses, workflow_id, sort_by, descending, limit, offset
    )
    pagination = {"offset": offset, "limit": limit, "total": total, "has_more": offset + len(found) < total}
    return web.json_response({"jobs": found, "pagination": pagination})


def _job(st: ServerState, job_id: str) -> dict[str, Any] | None:
    entry = st.store.history_entry(job_id)
    if entry is not None:
        return jobs.history_job(job_id, entry, detail=True)
    item = st.store.queued_item(job_id)
    if item is None:
        return None
    status = jobs.IN_PROGRESS if st.store.state_of(job_id) == "running" else jobs.PENDING
    return jobs.queue_job(item.as_list(), status, detail=True)


@routes.get("/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    """One job with its outputs, execution status and workflow; 404 `{"error": "Job not found"}`."""
    found = await asyncio.to_thread(_job, state(request), request.match_info["job_id"])
    return _refuse("Job not found", 404) if found is None else web.json_response(found)


async def cancel(st: ServerState, job_id: str) -> bool:
    """Dequeue a pending job or interrupt a running one; False for a finished or unknown id."""
    if await asyncio.to_thread(st.store.delete_pending, [job_id]):
        st.resolve_waiters(job_id, {})
        st.worker.broadcast_status()
        return True
    return st.worker.interrupt(job_id)  # only if it is the one running (or taken to run next)


@routes.post("/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    """Idempotent: a finished or unknown id answers 200 `{"cancelled": false}`."""
    return web.json_response({"cancelled": await cancel(state(request), request.match_info["job_id"])})


@routes.post("/jobs/cancel")
async def cancel_jobs(request: web.Request) -> web.Response:
    """`{"job_ids": [uuid, ...]}`: every id is checked first; then each is cancelled, best effort."""
    try:
        body = await read_json(request)
    except BadRequest:
        return _refuse("Request body must be valid JSON")
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        return _refuse("job_ids must be a list")
    invalid = [i if isinstance(i, str) else repr(i) for i in ids if not jobs.is_canonical_id(i)]
    if invalid:
        return _refuse("job_ids contains invalid id(s)", invalid_ids=invalid)
    st = state(request)
    results = [await cancel(st, job_id) for job_id in ids]
    return web.json_response({"cancelled": any(results)})


@routes.get("/global_subgraphs")
async def global_subgraphs(_: web.Request) -> web.Response:
    """Subgraph blueprints published by node packs: nodegraph loads no packs, so there are none."""
    return web.json_response({})


@routes.get("/global_subgraphs/{subgraph_id}")
async def global_subgraph(request: web.Request) -> web.Response:
    return web.json_response(
        {"error": f"no global subgraph {request.match_info['subgraph_id']!r}"}, status=404
    )


@routes.get("/node_replacements")
async def node_replacements(_: web.Request) -> web.Response:
    """`{old_class: [{new_node_id, input_mapping, output_mapping}]}`: no class of ours was replaced."""
    return web.json_response({})


OFFLINE = (
    "nodegraph never downloads models: it makes no requests to outside hosts. Download the file "
    "yourself and put it in the models folder the workflow names (see GET /api/experiment/models), "
    "then press R in the canvas to refresh the lists."
)


@routes.post("/models/download")
async def models_download(request: web.Request) -> web.Response:
    """The "missing models" dialog's download button: refused, with what to do instead."""
    body = await read_json(request, default={})
    models = body.get("models") if isinstance(body, dict) else None
    names = (
        [str(m.get("name"))[:200] for m in models if isinstance(m, dict)] if isinstance(models, list) else []
    )
    return web.json_response(
        {"error": {"type": "offline", "message": OFFLINE, "details": ", ".join(names), "extra_info": {}}},
        status=403,
    )


@routes.get("/models/download/{batch_id}")
async def models_download_status(request: web.Request) -> web.Response:
    return web.json_response({"error": {"type": "offline", "message": OFFLINE}}, status=404)
