"""Benchmarks: `python -m bench` runs them all, `python -m bench.<name>` one; figures go to RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """A one-line description of this machine, for the results file."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def record(area: str, lines: list[str]) -> None:
    """Put a dated block of result lines in this area's section of RESULTS.md (made if missing).

    The block replaces the section's previous run (only the latest run is kept; git keeps the
    history). Other areas' sections are left as they are.
    """
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    block = [f"{stamp}, {machine()}, load average {load:.1f} during the run:", "", *lines, ""]
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    heading = f"## {area}"
    parts = text.splitlines()
    if heading not in parts:
        parts += ["", heading, ""]
        end = len(parts)
    else:
        start = parts.index(heading) + 1
        end = next((i for i in range(start, len(parts)) if parts[i].startswith("## ")), len(parts))
        del parts[start:end]
        end = start
        block = ["", *block]
    parts[end:end] = block
    RESULTS.write_text("\n".join(parts).rstrip("\n") + "\n", encoding="utf-8")
