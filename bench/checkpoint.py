"""Checkpoint loading: time and peak memory of nodegraph's loader against a bare safetensors read.

    python -m bench.checkpoint [--runs N] [--no-record]

Generates (once) a full-size SD1.5-shaped LDM checkpoint with random fp16 weights in bench/out/
(UNet 860M parameters, CLIP-L, SD VAE: ~2.1 GB), then, each in a fresh subprocess:

* `safetensors.torch.load_file` of the file (fp16 tensors, what a bare read costs);
* `nodes.sd.checkpoint.load_checkpoint` (diffusers/transformers modules, UNet and VAE in fp32).

Peak RSS comes from `resource.getrusage` in the child. The child first imports torch, diffusers
and transformers and records its RSS, so the table can show what the load itself adds next to the
size of the weights it ends up holding (fp32: twice the fp16 file for UNet and VAE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
CKPT = OUT / "full_sd15_random.safetensors"
RESULTS = ROOT / "bench" / "RESULTS.md"
HEADING = "## Checkpoint loading (issue 3)"

CHILD = r"""
import json, resource, sys, time
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
import torch, diffusers, transformers, safetensors.torch
from nodes.sd.checkpoint import load_checkpoint
base = rss_mb()
t = time.perf_counter()
if sys.argv[1] == "bare":
    sd = safetensors.torch.load_file(sys.argv[2])
    held = sum(v.numel() * v.element_size() for v in sd.values())
elif sys.argv[1] == "bare_fp32":
    sd = {k: v.float() for k, v in safetensors.torch.load_file(sys.argv[2]).items()}
    held = sum(v.numel() * v.element_size() for v in sd.values())
else:
    ck = load_checkpoint(__import__("pathlib").Path(sys.argv[2]))
    mods = (ck.unet, ck.vae, ck.text_encoder)
    held = sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"wall": wall, "base_mb": base, "peak_mb": peak, "end_mb": rss_mb(), "held_mb": held / 2**20}
print(json.dumps(out))
"""


def ensure_checkpoint() -> float:
    """Write the full-size random checkpoint if absent; return the seconds spent."""
    if CKPT.exists():
        return 0.0
    from nodes.demo import UNET_FULL, write_checkpoint

    t = time.perf_counter()
    write_checkpoint(CKPT, unet=UNET_FULL, seed="nodegraph-bench")
    return time.perf_counter() - t


def measure(kind: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(CKPT)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return min(runs, key=lambda r: r["wall"])


def table(results: dict[str, dict[str, float]], runs: int) -> str:
    rows = [
        f"| loader (best of {runs}, fresh process) | wall | peak RSS | RSS before load | peak − before | "
        "RSS after | tensors held |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['wall']:.2f} s | {r['peak_mb'] / 1024:.2f} GiB | {r['base_mb'] / 1024:.2f} GiB | "
            f"{(r['peak_mb'] - r['base_mb']) / 1024:.2f} GiB | {r['end_mb'] / 1024:.2f} GiB | "
            f"{r['held_mb'] / 1024:.2f} GiB |"
        )
    return "\n".join(rows)


def record(text: str) -> None:
    """Replace this area's entry in bench/RESULTS.md with `text` (the latest run only; other sections
    untouched)."""
    content = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if HEADING not in content:
        RESULTS.write_text(content.rstrip("\n") + f"\n\n{HEADING}\n\n{text}\n")
        return
    start = content.index(HEADING) + len(HEADING)
    nxt = content.find("\n## ", start)
    end = len(content) if nxt < 0 else nxt
    RESULTS.write_text(content[:start] + f"\n\n{text}\n" + content[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-record", action="store_true", help="print only; do not write bench/RESULTS.md")
    args = parser.parse_args()
    made = ensure_checkpoint()
    size = CKPT.stat().st_size / 2**30
    results = {
        name: best([measure(kind) for _ in range(args.runs)])
        for name, kind in (
            ("safetensors.torch.load_file (lazy fp16 dict)", "bare"),
            ("load_file, then every tensor .float()", "bare_fp32"),
            ("nodegraph load_checkpoint (3 modules)", "nodegraph"),
        )
    }
    load = os.getloadavg()[0]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = (
        f"`python -m bench.checkpoint` — {stamp}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {load:.1f}; "
        f"file {CKPT.name}: {size:.2f} GiB fp16, "
        f"SD1.5 layout (UNet 859.5M params), random weights"
        + (f", generated in {made:.0f} s" if made else "")
    )
    text = f"{head}\n\n{table(results, args.runs)}"
    print(text)
    if not args.no_record:
        record(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
