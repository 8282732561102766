"""Comfy API v2's job and asset records, built from the queue and history (`routes_v2` serves them).

A job is `{id, status, created_at, started_at, completed_at, expires_at, queue_position, progress,
outputs, error, outputs_reused, urls}`: a finished prompt's from its history entry, a queued or
running one's from the queue and the worker (its step, node counts and the outputs shown so far).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

from nodegraph.server import jobs
from nodegraph.server.state import ServerState
from nodegraph.server.v2_assets import AssetIndex, AssetRecord

RETENTION = timedelta(days=7)
V1_TO_V2 = {
    jobs.PENDING: "queued",
    jobs.IN_PROGRESS: "running",
    jobs.COMPLETED: "succeeded",
    jobs.FAILED: "failed",
    jobs.CANCELLED: "canceled",
}
OUTPUT_KINDS = {"images": "image", "gifs": "video", "video": "video", "audio": "audio", "text": "text"}


def _iso_ms(ms: Any) -> str | None:
    return (
        datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat() if isinstance(ms, (int, float)) else None
    )


def asset_json(record: AssetRecord, base: str, *, created_new: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": record.id,
        "hash": record.hash,
        "size_bytes": record.size_bytes,
        "content_type": record.content_type,
        "file_path": record.file_path,
        "created_at": record.created_at,
        "url": f"{base}/api/v2/assets/{record.id}/content",
        "url_expires_at": (datetime.now(timezone.utc) + RETENTION).isoformat(),
    }
    if record.job_id:
        body["job_id"] = record.job_id
    if created_new is not None:
        body["created_new"] = created_new
    return body


def _outputs(index: AssetIndex, job_id: str, outputs: dict[str, Any], base: str) -> list[dict[str, Any]]:
    found = []
    for node_id, ui in outputs.items():
        for key, items in (ui or {}).items() if isinstance(ui, dict) else ():
            kind = OUTPUT_KINDS.get(key)
            for item in items if kind and isinstance(items, list) else ():
                if not (isinstance(item, dict) and "filename" in item):
                    continue
                record = index.output_record(job_id, item)
                if record is None:
                    continue
                body = asset_json(record, base)
                found.append({**body, "node_id": str(node_id), "name": record.file_path, "type": kind})
    return found


def _progress(st: ServerState, job_id: str) -> dict[str, Any]:
    step = getattr(st.worker, "step", None)
    node = getattr(st.worker, "current_node", None)
    done, total = st.worker.nodes_so_far(job_id)
    snap: dict[str, Any] = {"value": 0.0, "nodes_done": done, "nodes_total": total, "current_node": node}
    if step and step[1]:
        snap.update(value=min(max(step[0] / step[1], 0.0), 1.0), step=step[0], steps=step[1])
        snap["message"] = f"{node} {step[0]}/{step[1]}" if node else None
    return snap


def job_body(st: ServerState, index: AssetIndex, job_id: str, base: str) -> dict[str, Any] | None:
    """The v2 job for a prompt id, or None when the queue and history know no such prompt."""
    entry = st.store.history_entry(job_id)
    queued = None if entry is not None else st.store.queued_item(job_id)
    if entry is None and queued is None:
        return None
    position = progress = error = None
    outputs: list[dict[str, Any]] = []
    if entry is not None:
        v1 = jobs.history_job(job_id, entry)
        outputs = _outputs(index, job_id, entry.get("outputs") or {}, base)
        failure = v1.get("execution_error")
        if v1["status"] == jobs.FAILED:
            failure = failure or {}
            error = {
                "code": "node_execution_error",
                "message": str(failure.get("exception_message") or "execution failed"),
                "node_id": failure.get("node_id"),
                "class_type": failure.get("node_type"),
                "traceback": "".join(failure.get("traceback") or []) or None,
            }
        extra = entry["prompt"][3] if isinstance(entry.get("prompt"), list) else {}
    else:
        assert queued is not None
        running = st.store.state_of(job_id) == "running"
        v1 = jobs.queue_job(queued.as_list(), jobs.IN_PROGRESS if running else jobs.PENDING)
        if running:
            progress = _progress(st, job_id)
            # outputs populate while the job runs, as each node finishes (the contract's `outputs`)
            outputs = _outputs(index, job_id, st.worker.outputs_so_far(job_id), base)
        else:
            pending = [i.prompt_id for i in st.store.pending()]
            position = pending.index(job_id) + 1 if job_id in pending else None
        extra = queued.extra_data
    created_ms = v1.get("create_time") or time.time() * 1000
    created = datetime.fromtimestamp(created_ms / 1000, timezone.utc)
    body: dict[str, Any] = {
        "id": job_id,
        "status": V1_TO_V2[v1["status"]],
        "created_at": created.isoformat(),
        "started_at": _iso_ms(v1.get("execution_start_time")),
        "completed_at": _iso_ms(v1.get("execution_end_time")),
        "expires_at": (created + RETENTION).isoformat(),
        "queue_position": position,
        "progress": progress,
        "outputs": outputs,
        "error": error,
        "outputs_reused": False,
        # host-relative, as the contract's JobUrls allow and the reference proxy sends: clients
        # resolve them against the origin they called, so no request header shapes them
        "urls": {
            "self": f"/api/v2/jobs/{job_id}",
            "events": f"/api/v2/jobs/{job_id}/events",
            "cancel": f"/api/v2/jobs/{job_id}/cancel",
        },
    }
    labels = extra.get("v2_metadata") if isinstance(extra, dict) else None
    if isinstance(labels, dict):
        body["metadata"] = labels
    return body
