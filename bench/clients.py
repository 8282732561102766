"""Client APIs: `/api/jobs` list latency over 10,000 history entries, and what the A1111 mapping adds
to a request over posting the same graph to `/prompt` (request -> graph, infotext PNG).

`python -m bench.clients` — in-process, no model; prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from PIL import Image

from nodegraph.server import a1111
from nodegraph.server.queue import PromptStore, _job_row
from nodegraph.server.routes_jobs import list_jobs

HISTORY = 10_000


def _entry(n: int) -> dict[str, Any]:
    """A history entry the size of a canvas run: the 7-node prompt and a workflow blob."""
    job = a1111.Job(
        "a photo of a cat", "blurry", 20, 7.0, "euler", "normal", n, 512, 512, 1, "m.safetensors", 1
    )
    workflow = {
        "id": str(uuid.uuid4()),
        "nodes": [{"id": i, "widgets_values": ["x" * 200]} for i in range(8)],
    }
    extra = {"create_time": 1_700_000_000_000 + n, "extra_pnginfo": {"workflow": workflow}}
    t0 = extra["create_time"] + 10
    return {
        "prompt": [n, f"p{n}", job.graph(), extra, ["9"]],
        "outputs": {"9": {"images": [{"filename": f"a_{n:05}_.png", "subfolder": "", "type": "output"}]}},
        "status": {"status_str": "success", "completed": True, "messages": [
            ["execution_start", {"timestamp": t0}], ["execution_success", {"timestamp": t0 + 900}]]},
        "meta": {},
    }  # fmt: skip


def _timed(fn: Any, runs: int) -> float:
    """Median milliseconds of `runs` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def jobs_latency(folder: Path) -> list[tuple[str, float]]:
    store = PromptStore(folder / "queue.sqlite3", max_history=HISTORY)
    # Filled in one transaction with the rows `finish` writes (10,000 commits take minutes).
    rows = [
        (f"p{n}", json.dumps(e), *_job_row(f"p{n}", e)) for n, e in ((n, _entry(n)) for n in range(HISTORY))
    ]
    store._db.execute("BEGIN")
    store._db.executemany(
        "INSERT INTO history (prompt_id, entry, job, status, create_time, duration, workflow_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    store._db.execute("COMMIT")
    st = SimpleNamespace(store=store)
    done = ["completed", "failed", "cancelled"]
    queries = [
        ("canvas start: finished, limit 64", (done, None, "created_at", True, 64, 0)),
        ("finished, limit 200, offset 9,000", (done, None, "created_at", True, 200, 9000)),
        ("all statuses by duration, no limit", (list(done) + ["pending", "in_progress"], None,
                                                "execution_duration", True, None, 0)),
    ]  # fmt: skip
    rows = [(name, _timed(lambda a=args: list_jobs(st, *a), 9)) for name, args in queries]  # type: ignore[arg-type]
    store.close()
    return rows


def a1111_overhead() -> list[tuple[str, float]]:
    job = a1111.Job(
        "a cat <lora:x:0.8>", "blurry", 20, 7.0, "euler", "karras", 1, 512, 512, 1, "m.safetensors", 2
    )
    png = io.BytesIO()
    Image.new("RGB", (512, 512), (120, 30, 200)).save(png, format="PNG")
    raw = png.getvalue()

    def reencode() -> None:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", a1111.infotext(job, 1, "0123456789", {"x": "0123456789ab"}, "nodegraph"))
        with Image.open(io.BytesIO(raw)) as image:
            image.save(io.BytesIO(), format="PNG", pnginfo=info)

    return [
        ("names + graph (sampler map, LoRA tags, 10 nodes)",
         _timed(lambda: (a1111.sampler_and_scheduler("DPM++ 2M Karras", None), job.graph()), 200)),
        ("infotext + PNG re-encode, 512x512", _timed(reencode, 20)),
    ]  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        jobs = jobs_latency(Path(folder))
    extra = a1111_overhead()
    print(f"`python -m bench.clients` — {HISTORY:,} history entries in the SQLite queue file, median of 9\n")
    print("| /api/jobs query | ms |\n|---|---|")
    for name, ms in jobs:
        print(f"| {name} | {ms:.1f} |")
    print("\n| A1111 mapping, added per request | ms |\n|---|---|")
    for name, ms in extra:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
