"""Server load benchmark, loopback only and bounded in time.

1. Start a real server in a child process, on a free loopback port, over stub nodes whose
   "sampler" burns CPU in Python for a few ms per step (holding the GIL, the worst case for the
   event loop; torch's kernels release it).
2. Connect 50 websocket clients, POST 500 small prompts (50 at a time, each from its client id),
   and wait until every prompt's `executing {node: null}` arrived; check every history entry exists.
3. While one long prompt samples, GET /system_stats 100 times and record the latencies.

Prints a table and appends it to bench/RESULTS.md under "## Server (issue 5)".

    .venv/bin/python -m bench.load [--clients 50] [--prompts 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench import record
from nodegraph.node import Int, Node, Output, Result, RunContext, Socket
from nodegraph.types import IMAGE, LATENT

AREA = "Server (issue 5)"
TIME_LIMIT_S = 300.0


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class BenchSeed(Node):
    """Stand-in latent."""

    INPUTS = (Int("seed", 0, min=0, max=2**31),)
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, seed: int) -> tuple[Any, ...]:
        return (seed,)


class BenchSampler(Node):
    """Stand-in sampler: `steps` steps of `step_ms` pure-Python CPU work each."""

    INPUTS = (
        Socket("latent", socket_type=LATENT),
        Int("steps", 4, min=1, max=10000),
        Int("step_ms", 2, min=0),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, latent: Any, steps: int, step_ms: int) -> tuple[Any, ...]:
        for step in range(steps):
            _burn(step_ms / 1000)
            ctx.progress(step + 1, steps)
        return (latent,)


class BenchSave(Node):
    """Stand-in save: shows a file name, writes nothing."""

    OUTPUT_NODE = True
    INPUTS = (Socket("images", socket_type=IMAGE),)
    OUTPUTS = ()

    def run(self, ctx: RunContext, images: Any) -> Result:
        image = {"filename": f"bench_{images}.png", "subfolder": "", "type": "output"}
        return Result((), {"images": [image]})


def prompt(seed: int, steps: int = 4, step_ms: int = 2) -> dict[str, Any]:
    return {
        "1": {"class_type": "BenchSeed", "inputs": {"seed": seed}},
        "2": {
            "class_type": "BenchSampler",
            "inputs": {"latent": ["1", 0], "steps": steps, "step_ms": step_ms},
        },
        "3": {"class_type": "BenchSave", "inputs": {"images": ["2", 0]}},
    }


# ------------------------------------------------------------------------------------ the server


def serve(base: Path, port_file: Path, real: bool = False) -> None:
    """Child process: a server over the bench nodes (or the real ones) on 127.0.0.1, port to `port_file`."""
    from aiohttp import web

    from nodegraph.engine import Settings, build_engine
    from nodegraph.server import create_app

    stubs = None if real else [BenchSeed, BenchSampler, BenchSave]
    engine = build_engine(Settings(base_directory=base, port=0), nodes=stubs)

    async def main() -> None:
        runner = web.AppRunner(create_app(engine), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port_file.write_text(str(site._server.sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


def start_server(base: Path, real: bool = False) -> tuple[subprocess.Popen[bytes], str]:
    port_file = base / "port"
    mode = "--serve-real" if real else "--serve"
    child = subprocess.Popen([sys.executable, "-m", "bench.load", mode, str(base), str(port_file)])
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text():
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)
    return child, f"127.0.0.1:{port_file.read_text()}"


# ------------------------------------------------------------------------------------ the clients


async def follow(
    ws: aiohttp.ClientWebSocketResponse, finished: set[str], done: asyncio.Event, total: int
) -> None:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        data = json.loads(msg.data)
        if data["type"] == "executing" and data["data"]["node"] is None:
            finished.add(data["data"]["prompt_id"])
            if len(finished) >= total:
                done.set()


async def load_phase(
    session: aiohttp.ClientSession, base: str, clients: int, prompts: int
) -> dict[str, float]:
    sockets = [await session.ws_connect(f"ws://{base}/ws?clientId=c{i}") for i in range(clients)]
    finished: set[str] = set()
    done = asyncio.Event()
    followers = [asyncio.create_task(follow(ws, finished, done, prompts)) for ws in sockets]
    latencies: list[float] = []
    ids: list[str] = []
    start = time.perf_counter()

    async def post(i: int) -> None:
        t0 = time.perf_counter()
        body = {"prompt": prompt(i), "client_id": f"c{i % clients}"}
        async with session.post(f"http://{base}/prompt", json=body) as resp:
            ids.append((await resp.json())["prompt_id"])
        latencies.append(time.perf_counter() - t0)

    for first in range(0, prompts, clients):  # `clients` requests in flight at a time
        await asyncio.gather(*(post(i) for i in range(first, min(first + clients, prompts))))
    queued_at = time.perf_counter()
    await asyncio.wait_for(done.wait(), TIME_LIMIT_S)
    elapsed = time.perf_counter() - start
    async with session.get(f"http://{base}/history") as resp:
        history = await resp.json()
    missing = [i for i in ids if i not in history or not history[i]["status"]["completed"]]
    for ws in sockets:
        await ws.close()
    for task in followers:
        task.cancel()
    if missing or len(finished) != prompts:
        raise AssertionError(f"{len(missing)} prompts missing from history, {len(finished)} finished")
    latencies.sort()
    return {
        "throughput": prompts / elapsed,
        "post_p50_ms": 1000 * latencies[len(latencies) // 2],
        "post_p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
        "queue_s": queued_at - start,
        "total_s": elapsed,
    }


async def stats_phase(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """GET /system_stats every 20 ms while a long prompt samples (400 steps of 10 ms GIL-held work)."""
    long_prompt = {"prompt": prompt(10**6, steps=400, step_ms=10)}
    async with session.post(f"http://{base}/prompt", json=long_prompt) as r:
        prompt_id = (await r.json())["prompt_id"]
    await asyncio.sleep(0.2)
    times = []
    for _ in range(100):
        t0 = time.perf_counter()
        async with session.get(f"http://{base}/system_stats") as resp:
            await resp.read()
        times.append(1000 * (time.perf_counter() - t0))
        await asyncio.sleep(0.02)
    async with session.get(f"http://{base}/api/jobs/{prompt_id}") as resp:
        still_running = (await resp.json())["status"] == "in_progress"
    await session.post(f"http://{base}/interrupt")
    times.sort()
    return {"p50_ms": times[50], "p99_ms": times[98], "max_ms": times[-1], "sampling": float(still_running)}


async def run(clients: int, prompts: int) -> tuple[dict[str, float], dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        child, base = start_server(Path(tmp))
        try:
            timeout = aiohttp.ClientTimeout(total=TIME_LIMIT_S)
            connector = aiohttp.TCPConnector(limit=clients + 10)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
                load = await load_phase(session, base, clients, prompts)
                stats = await stats_phase(session, base)
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(30)
    return load, stats


def real_txt2img(seed: int, size: int, steps: int) -> dict[str, Any]:
    """ComfyUI's basic API example graph on the checkpoint `bench.safetensors`."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "bench.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
    }  # fmt: skip


async def real_phase(checkpoint: Path, size: int, steps: int) -> dict[str, float]:
    """GET /system_stats every 20 ms through a whole real prompt: model load, encode, sampling, decode."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models" / "checkpoints").mkdir(parents=True)
        os.symlink(checkpoint.resolve(), Path(tmp) / "models" / "checkpoints" / "bench.safetensors")
        child, base = start_server(Path(tmp), real=True)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIME_LIMIT_S)) as session:
                body = {"prompt": real_txt2img(1, size, steps)}
                async with session.post(f"http://{base}/prompt", json=body) as resp:
                    prompt_id = (await resp.json())["prompt_id"]
                start, times, status = time.perf_counter(), [], "pending"
                while status in ("pending", "in_progress") and time.perf_counter() - start < TIME_LIMIT_S:
                    t0 = time.perf_counter()
                    async with session.get(f"http://{base}/system_stats") as resp:
                        await resp.read()
                    times.append(1000 * (time.perf_counter() - t0))
                    async with session.get(f"http://{base}/api/jobs/{prompt_id}") as resp:
                        status = (await resp.json())["status"]
                    await asyncio.sleep(0.02)
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(30)
    times.sort()
    n = len(times)
    return {
        "n": n,
        "p50_ms": times[n // 2],
        "p99_ms": times[max(int(n * 0.99) - 1, 0)],
        "max_ms": times[-1],
        "prompt_s": time.perf_counter() - start,
        "ok": float(status == "success"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "PORT_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-real", nargs=2, metavar=("DIR", "PORT_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help="also time /system_stats through a real prompt on it")
    parser.add_argument("--size", type=int, default=256, help="image size of the real prompt")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps of the real prompt")
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch RESULTS.md")
    args = parser.parse_args()
    if args.serve or args.serve_real:
        where = args.serve or args.serve_real
        serve(Path(where[0]), Path(where[1]), real=bool(args.serve_real))
        return
    load, stats = asyncio.run(run(args.clients, args.prompts))
    lines = [
        f"`python -m bench.load --clients {args.clients} --prompts {args.prompts}`: server in a child "
        "process on loopback, stub nodes (4 sampler steps × 2 ms CPU each)",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| websocket clients | {args.clients} |",
        f"| prompts queued, all in history | {args.prompts} |",
        f"| throughput (queued → last finished) | {load['throughput']:.1f} prompts/s |",
        f"| time to queue all prompts | {load['queue_s']:.1f} s of {load['total_s']:.1f} s |",
        f"| POST /prompt latency p50 / p99 ({args.clients} in flight) | "
        f"{load['post_p50_ms']:.1f} / {load['post_p99_ms']:.1f} ms |",
        f"| /system_stats while sampling (GIL-held 10 ms steps) p50 / p99 / max | "
        f"{stats['p50_ms']:.1f} / {stats['p99_ms']:.1f} / {stats['max_ms']:.1f} ms |",
    ]
    if not stats["sampling"]:
        lines.append("| note | the long prompt had finished before the /system_stats samples ended |")
    if args.checkpoint:
        real = asyncio.run(real_phase(args.checkpoint, args.size, args.steps))
        lines.append(
            f"| /system_stats through a real txt2img ({args.checkpoint.name}, {args.size}², "
            f"{args.steps} steps, "
            f"model load included, {real['prompt_s']:.0f} s, {real['n']:.0f} samples) p50 / p99 / max | "
            f"{real['p50_ms']:.1f} / {real['p99_ms']:.1f} / {real['max_ms']:.1f} ms |"
        )
        if not real["ok"]:
            lines.append("| note | the real prompt did not succeed |")
    print("\n".join(lines))
    if not args.no_record:
        record(AREA, lines)


if __name__ == "__main__":
    main()
