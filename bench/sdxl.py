"""SDXL (issue 10) on a full-size SDXL-shaped checkpoint: loading, sampler overhead, LoRA strength change.

    python -m bench.sdxl [--parts load,sampling,lora] [--no-record] [--device cuda --precision fp16]

The checkpoint is generated once, streaming (one tensor in memory at a time), as
`full_sdxl_random.safetensors` in $NODEGRAPH_BENCH_CACHE (default bench/out/): the SGM single-file
layout of SDXL 1.0 (UNet 2,567M parameters with SDXL's config, CLIP-L, OpenCLIP bigG in open_clip
names, the SD VAE), random fp16 weights (nodes/demo.py's deterministic generator), 6.5 GiB.

Each measure runs in a fresh child process, one at a time (this kind of machine is shared):

* load: time and peak RSS of `load_checkpoint` against a bare safetensors read of the same file
  (`load_file`, every byte read once). Target: peak RSS <= 1.1x the weights as computed (fp32
  modules on the CPU).
* sampling: KSampler time per step against a bare batched UNet forward of the same shapes
  (512x512, 2 steps, cfg 7, euler/normal; bench/sampling.py's helpers); the UNet alone is loaded.
  Target: overhead <= 3 %.
* lora: a rank-32 kohya SDXL LoRA on every attention projection (UNet attn1/attn2 q, k, v, out in
  SGM names; CLIP-L and bigG self-attention): first application, strength_model and strength_clip
  changes, re-applied from the file, against bench/lora.py's floor and with its targets. The UNet
  and the text encoders are measured in separate children (together they do not fit beside the
  patcher's backups on a shared 24 GB machine).

Before each child, MemAvailable is checked against what it needs; a part that does not fit is
skipped and says so. Parts run separately keep the others' latest figures (bench/out/sdxl.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import record, table
from nodes.demo import random_tensor, vae_specs
from nodes.demo_sdxl import G_BASE, SdxlShape, clip_g_specs, clip_l_specs, unet_specs

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PARTS_FILE = OUT / "sdxl.json"
NAME = "full_sdxl_random.safetensors"
SEED = "nodegraph-bench-sdxl"
# SDXL 1.0 base: levels 320/640/1280, 2 res blocks, transformer depths 0/2/10, middle 10; CLIP-L 12, bigG 32
FULL = SdxlShape(
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    depth=(0, 2, 10),
    mid_depth=10,
    model_channels=320,
    clip_l_layers=12,
    clip_g_layers=32,
)
GIB = 2**30
# What each child may hold at its peak (GiB), checked against MemAvailable before it starts
NEEDS = {"bare": 7.5, "nodegraph": 14.5, "sampling": 11.5, "lora-unet": 12.5, "lora-te": 5.5}
SIZE, STEPS, REPEATS, RANK = 512, 2, 2, 32
ATTN = re.compile(r"\.attn[12]\.to_(q|k|v|out\.0)\.weight$")
TE_ATTN = re.compile(r"\.self_attn\.(q|k|v|out)_proj\.weight$")


def cache_dir() -> Path:
    return Path(os.environ.get("NODEGRAPH_BENCH_CACHE", OUT))


Item = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def checkpoint_items() -> Iterator[Item]:
    """(key, shape, make the fp16 array) for every tensor of the full-size file."""
    specs = [*unet_specs(FULL), *vae_specs(), *clip_l_specs(12), *clip_g_specs(32, G_BASE)]
    for key, shape, kind, fan in specs:
        yield key, shape, functools.partial(random_tensor, SEED, key, shape, kind, fan)
    yield f"{G_BASE}logit_scale", (), lambda: np.array(np.log(100.0), dtype=np.float16)


def write_streaming(path: Path, items: list[Item], metadata: dict[str, str]) -> None:
    """A .safetensors file (fp16) written one tensor at a time: the header first (shapes are known),
    then each tensor's bytes as it is generated, so memory holds one tensor, never the file.
    Atomic: written as `.partial`, renamed when complete."""
    items = sorted(items, key=lambda item: item[0])
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, shape, _ in items:
        size = math.prod(shape) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, shape, make in items:
            array = make()
            assert array.dtype == np.float16 and array.shape == shape, key
            f.write(np.ascontiguousarray(array).data)
    partial.replace(path)


def ensure_checkpoint() -> tuple[Path, float]:
    """(the full-size file, seconds spent generating it now: 0 when it was there)."""
    path = cache_dir() / NAME
    if path.exists():
        return path, 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(checkpoint_items())
    need = sum(math.prod(s) * 2 for _, s, _ in items)
    free = shutil.disk_usage(path.parent).free
    if free < need + 2 * GIB:
        raise SystemExit(
            f"bench.sdxl: {path.parent} has {free / GIB:.1f} GiB free; the file needs {need / GIB:.1f}"
        )
    start = time.perf_counter()
    write_streaming(path, items, {"nodegraph_bench": "random weights (SDXL 1.0-shaped): images are noise"})
    return path, time.perf_counter() - start


def lora_modules() -> list[tuple[str, tuple[int, ...]]]:
    """(kohya stem, weight shape) of every attention projection: UNet in SGM names (sd-scripts'
    SDXL naming), CLIP-L as `lora_te1_`, bigG's q/k/v/out as `lora_te2_` (HF names, as kohya's)."""
    out = []
    for key, shape, _, _ in unet_specs(FULL, prefix=""):
        if ATTN.search(key):
            out.append(("lora_unet_" + key.removesuffix(".weight").replace(".", "_"), shape))
    for key, shape, _, _ in clip_l_specs(12, prefix="text_model."):
        if TE_ATTN.search(key):
            out.append(("lora_te1_" + key.removesuffix(".weight").replace(".", "_"), shape))
    for n in range(FULL.clip_g_layers):
        for proj in ("q", "k", "v", "out"):
            out.append((f"lora_te2_text_model_encoder_layers_{n}_self_attn_{proj}_proj", (1280, 1280)))
    return out


def mem_available() -> float:
    """MemAvailable in GiB (inf where /proc/meminfo is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf


def child(kind: str, *args: str) -> dict[str, Any]:
    """Run one measure in a fresh process (after checking it fits in memory); its JSON result."""
    free = mem_available()
    if free < NEEDS[kind]:
        return {"skipped": f"{free:.1f} GiB available, needs {NEEDS[kind]:.1f}"}
    print(f"bench.sdxl: {kind} ...", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "bench._sdxl_child", kind, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average"] = os.getloadavg()[0]
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return result


def run_parts(parts: list[str], path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measure `parts`, merged into the latest stored results of the others."""
    results: dict[str, Any] = json.loads(PARTS_FILE.read_text()) if PARTS_FILE.exists() else {}
    if "load" in parts:
        results["bare"] = child("bare", str(path))
        results["nodegraph"] = child("nodegraph", str(path))
    if "sampling" in parts:
        size = args.size or (1024 if args.device.startswith("cuda") else SIZE)
        shape = (str(size), str(args.steps), str(args.repeats), args.device, args.precision)
        results["sampling"] = child("sampling", str(path), *shape)
    if "lora" in parts:
        lora_file = cache_dir() / f"full_sdxl_attention_lora_r{RANK}.safetensors"
        if not lora_file.exists():
            from bench.lora import write_kohya

            partial = lora_file.with_name(lora_file.name + ".partial")
            write_kohya(partial, lora_modules(), RANK)
            partial.replace(lora_file)
        results["lora-unet"] = child("lora-unet", str(path), str(lora_file))
        results["lora-te"] = child("lora-te", str(path), str(lora_file))
    PARTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    PARTS_FILE.write_text(json.dumps(results, indent=1))
    return results


def _gib(value: float) -> str:
    return f"{value:.2f} GiB"


def _missing(result: dict[str, Any] | None) -> str | None:
    if result is None:
        return "not run"
    return result.get("skipped") or result.get("failed")


def _stamp(result: dict[str, Any]) -> str:
    return f"{result['when']}, load average {result['load_average']:.1f}"


def load_lines(results: dict[str, Any]) -> list[str]:
    rows = []
    for key, label in (
        ("bare", "safetensors `load_file`, every byte read once (mmap, fp16)"),
        ("nodegraph", "nodegraph `load_checkpoint` (UNet, VAE, CLIP-L, bigG)"),
    ):
        r = results.get(key)
        if (why := _missing(r)) is not None:
            rows.append([label, why, "", "", "", ""])
            continue
        assert r is not None
        ratio = f"{r['peak_gib'] / r['held_gib']:.3f}×"
        rows.append(
            [
                label,
                f"{r['wall']:.1f} s",
                _gib(r["peak_gib"]),
                _gib(r["base_gib"]),
                _gib(r["held_gib"]),
                ratio,
            ]
        )
    lines = [
        "**Loading** (fresh process each, one run; " + _when(results, "nodegraph") + "). "
        "Target: peak RSS ≤ 1.1× the weights held (fp32 modules on the CPU).",
        "",
    ]
    return lines + table(["loader", "wall", "peak RSS", "RSS before", "weights held", "peak / held"], rows)


def _when(results: dict[str, Any], key: str) -> str:
    r = results.get(key)
    return _stamp(r) if r is not None and _missing(r) is None else "not measured"


def sampling_lines(results: dict[str, Any]) -> list[str]:
    r = results.get("sampling")
    if (why := _missing(r)) is not None:
        return [f"**Sampling**: {why}."]
    assert r is not None
    overhead = (r["step"] - r["forward"]) / r["forward"] * 100
    latent = r["size"] // 8
    rows = [
        [f"bare UNet forward, batch 2, latent {latent}x{latent}", f"{r['forward']:.2f} s", "-"],
        [
            f"KSampler per step ({r['steps']} steps, cfg 7, euler/normal)",
            f"{r['step']:.2f} s",
            f"{1 / r['step']:.3f} it/s",
        ],
        ["KSampler overhead over the bare forward", f"{overhead:+.1f} %", "<= 3 %"],
        [
            "KSampler time outside the UNet calls (same runs; robust under load)",
            f"{r['outside'] * 100:.2f} %",
            "<= 3 %",
        ],
    ]
    head = (
        f"**Sampling** ({_stamp(r)}): SDXL UNet from the file, {r['params'] / 1e6:.0f}M parameters, "
        f"{r['precision']} on {r['device']}, {r['size']}x{r['size']}, fastest of {r['repeats']} "
        f"alternating runs; peak RSS {_gib(r['peak_gib'])}."
    )
    return [head, "", *table(["measure", "result", "target / rate"], rows)]


def lora_lines(results: dict[str, Any]) -> list[str]:
    unet, te = results.get("lora-unet"), results.get("lora-te")
    rows: list[list[str]] = []
    phases = {
        "lora-unet": (
            ("first", "first application (read, decode, fuse)"),
            ("change", "strength_model change (runtime branches)"),
            ("settle", "same strengths asked again: branches fused"),
            ("from_file", "re-applied from the file (read, decode, rewrite)"),
        ),
        "lora-te": (
            ("first", "first application (read, decode, fuse)"),
            ("first_change", "first strength_clip change after applying (keeps ΔW)"),
            ("change", "strength_clip change"),
            ("from_file", "re-applied from the file (read, decode, rewrite)"),
        ),
    }
    for key, part in (("lora-unet", "UNet"), ("lora-te", "CLIP-L + bigG")):
        r = results.get(key)
        if (why := _missing(r)) is not None:
            rows.append([f"{part}: {why}", "", "", "", "", ""])
            continue
        assert r is not None
        floor, touched = r["floor"][0], r["touched_gib"] * GIB
        for name, label in phases[key]:
            secs, peak = r[name]
            rows.append(
                [
                    f"{part}: {label}",
                    f"{secs * 1e3:.0f} ms",
                    f"{floor * 1e3:.0f} ms",
                    f"{secs / floor:.3f}×",
                    f"{peak / 2**20:.0f} MiB",
                    f"{peak / touched:.2f}×",
                ]
            )
    lines = [
        f"**LoRA** ({_when(results, 'lora-unet')}): kohya rank {RANK} on every attention projection "
        "(UNet attn1/attn2 q, k, v, out in SGM names; CLIP-L and bigG self-attention). Targets: "
        "strength change ≤ 2× floor and ≥ 5× faster than from the file; memory growth ≤ touched "
        "weights. Process CPU time, one torch thread, median of 3.",
        "",
    ]
    lines += table(["phase", "CPU time", "floor", "time/floor", "peak RSS growth", "RSS/touched"], rows)
    if _missing(unet) is None and _missing(te) is None:
        assert unet is not None and te is not None
        both = unet["change"][0] + te["change"][0]
        ratios = [
            ["from the file / strength_model change", f"{unet['from_file'][0] / unet['change'][0]:.0f}×"],
            ["from the file / strength_clip change", f"{te['from_file'][0] / te['change'][0]:.1f}×"],
            [
                "from the file / both changed (e.g. an A1111 tag)",
                f"{(unet['from_file'][0] + te['from_file'][0]) / both:.1f}×",
            ],
            [
                "weights rewritten by the first application (UNet, TE)",
                f"{unet['rewritten']}, {te['rewritten']}",
            ],
            ["touched weights, fp32 (UNet, TE)", f"{_gib(unet['touched_gib'])}, {_gib(te['touched_gib'])}"],
            [
                "held by the patcher (backups, kept TE ΔW)",
                f"{_gib(unet['held_gib'])}, {_gib(te['held_gib'])}",
            ],
            ["peak RSS of the child (UNet, TE)", f"{_gib(unet['peak_gib'])}, {_gib(te['peak_gib'])}"],
        ]
        lines += ["", *table(["comparison", "figure"], ratios)]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="load,sampling,lora", help="comma-separated: load, sampling, lora")
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch RESULTS.md")
    parser.add_argument("--device", default="cpu", help="sampling: cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--size", type=int, default=0, help="sampling: image size (512 on a CPU, else 1024)")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=REPEATS, help="sampling: alternating runs")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    path, made = ensure_checkpoint()
    results = run_parts(parts, path, args)
    size = path.stat().st_size / GIB
    lines = [
        f"`python -m bench.sdxl`: {path.name}, {size:.2f} GiB fp16, SGM single file shaped as SDXL 1.0 "
        "(UNet 2,567M parameters, CLIP-L, bigG 695M, SD VAE), random weights, generated streaming"
        + (f" in {made:.0f} s" if made else "")
        + ". Shared 2-core machine; each part in its own process, one at a time.",
        "",
        *load_lines(results),
        "",
        *sampling_lines(results),
        "",
        *lora_lines(results),
    ]
    print("\n".join(lines))
    if not args.no_record:
        record("SDXL (issue 10)", lines)


if __name__ == "__main__":
    main()
