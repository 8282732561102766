"""ComfyUI's job records (`/api/jobs`): queue items and history entries in one shape.

The rules follow ComfyUI's `comfy_execution/jobs.py`: status from the history's status and its
messages (an interruption is `cancelled`), times from the `execution_*` messages, the preview
output is the first saved visual output, else any other previewable one. Keys whose value is
None are left out, as ComfyUI's `prune_dict` does.
"""

from __future__ import annotations

import uuid
from typing import Any

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "in_progress",
    "completed",
    "failed",
    "cancelled",
)
ALL_STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
HISTORY_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})
PREVIEWABLE_MEDIA = frozenset({"images", "video", "audio", "3d", "text"})
THREE_D_EXTENSIONS = (".obj", ".fbx", ".gltf", ".glb", ".usdz")
TEXT_EXTENSIONS = (".txt", ".md", ".json")


def is_canonical_id(value: Any) -> bool:
    """A job id as ComfyUI accepts it from clients: a UUID in lowercase hyphenated form."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _pruned(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _metadata(extra_data: dict[str, Any]) -> tuple[Any, Any]:
    """(create_time, workflow_id) from a prompt's extra_data."""
    pnginfo = extra_data.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    workflow_id = workflow.get("id") if isinstance(workflow, dict) else None
    return extra_data.get("create_time"), workflow_id


def queue_job(item: list[Any], status: str, *, detail: bool = False) -> dict[str, Any]:
    """A pending or running prompt (`QueueItem.as_list()`) as a job."""
    number, prompt_id, prompt, extra_data, _ = item
    create_time, workflow_id = _metadata(extra_data)
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "outputs_count": 0,
            "previewable_outputs_count": 0,
            "workflow_id": workflow_id,
        }
    )
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def history_job(prompt_id: str, entry: dict[str, Any], *, detail: bool = False) -> dict[str, Any]:
    """A history entry as a job; `detail` adds outputs, execution status and the workflow."""
    queued = entry.get("prompt")
    # A malformed entry (hand-edited file) still lists, with what can be read from it.
    number, _, prompt, extra_data, _ = queued if isinstance(queued, list) and len(queued) == 5 else [None] * 5
    create_time, workflow_id = _metadata(_dict(extra_data))
    status_info: dict[str, Any] = _dict(entry.get("status"))
    outputs: dict[str, Any] = _dict(entry.get("outputs"))
    start = end = error = None
    interrupted = False
    for message in status_info.get("messages") or []:
        if not (isinstance(message, (list, tuple)) and len(message) >= 2 and isinstance(message[1], dict)):
            continue
        kind, data = message[0], message[1]
        if kind == "execution_start":
            start = data.get("timestamp")
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if kind == "execution_error" else error
            interrupted = interrupted or kind == "execution_interrupted"
    if status_info.get("status_str") == "error":
        status = CANCELLED if interrupted else FAILED
    else:
        status = COMPLETED
    count, preview, previewable = _outputs_summary(outputs)
    job = _pruned(
        {
            "id": prompt_id,
            "status": status,
            "priority": number,
            "create_time": create_time,
            "execution_start_time": start,
            "execution_end_time": end,
            "execution_error": error,
            "outputs_count": count,
            "previewable_outputs_count": previewable,
            "preview_output": preview,
            "workflow_id": workflow_id,
            "worker": entry.get("worker"),  # which Ray worker ran it (`serve --workers N`)
        }
    )
    if detail:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _previewable(media: str, item: dict[str, Any]) -> bool:
    if media in PREVIEWABLE_MEDIA:
        return True
    fmt = str(item.get("format", ""))
    if fmt.startswith(("video/", "audio/")):
        return True
    return str(item.get("filename", "")).lower().endswith(THREE_D_EXTENSIONS + TEXT_EXTENSIONS)


def _outputs_summary(outputs: dict[str, Any]) -> tuple[int, dict[str, Any] | None, int]:
    """(outputs_count, preview_output, previewable_outputs_count) of a history entry's outputs."""
    count = previewable = 0
    saved = other = text_file = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media, items in node_outputs.items():
            if media == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, str) and item.lower().endswith(THREE_D_EXTENSIONS):
                    item = {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"}
                if not isinstance(item, dict):
                    continue  # text values are preview metadata, not outputs
                count += 1
                if not _previewable(media, item):
                    continue
                previewable += 1
                enriched = {**item, "nodeId": node_id}
                enriched.setdefault("mediaType", media)
                is_text = media == "text" or str(item.get("filename", "")).lower().endswith(TEXT_EXTENSIONS)
                if is_text:
                    text_file = text_file or enriched
                elif item.get("type") == "output":
                    saved = saved or enriched
                else:
                    other = other or enriched
    return count, saved or other or text_file, previewable


def duration(job: dict[str, Any]) -> int:
    """The `execution_duration` sort key: end minus start, 0 when either is unknown."""
    start, end = job.get("execution_start_time") or 0, job.get("execution_end_time") or 0
    return int(end - start) if start and end else 0
