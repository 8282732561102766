"""Soak: 5,000 prompts from 16 concurrent clients while 500 websocket clients listen (issue 15).

The server runs in its own process over the stub nodes of `tests/server/stubs.py` (no model), so
its RSS, its SQLite file and its temp folder are measured alone. Targets: no 5xx, RSS growth under
100 MB, p99 `POST /prompt` under 100 ms. `python -m bench.soak [--prompts N --sockets N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CONCURRENCY = 16


def serve(base: Path) -> None:
    """Child process: the server over the stub nodes on a free port (printed), until killed."""
    from aiohttp import web

    from nodegraph.server import create_app
    from tests.server.stubs import make_engine

    workers = None
    if os.environ.get("SOAK_IDLE_WORKER"):  # `--idle-worker`: the POSTs' own cost, no prompt runs
        from nodegraph.server.worker import Worker

        class Idle(Worker):
            def start(self) -> None:
                pass

        workers = Idle
    app = create_app(make_engine(base), workers=workers)
    app.router.add_get("/_soak/threads", _thread_cpu)
    if os.environ.get("SOAK_PROFILE"):
        _profile_threads(app, Path(os.environ["SOAK_PROFILE"]))
    web.run_app(app, host="127.0.0.1", port=int(os.environ.get("SOAK_PORT", "0") or 0), print=print)


async def _thread_cpu(request: Any) -> Any:
    """CPU seconds of each thread of the server so far, by thread name (pool threads summed)."""
    import re
    import threading

    from aiohttp import web

    seconds: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for thread in threading.enumerate():
        try:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        name = re.sub(r"_\d+$", "", thread.name)  # pool threads: asyncio_0, asyncio_1 -> asyncio
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return web.json_response(seconds)


def _profile_threads(app: Any, out: Path) -> None:
    """cProfile every thread of the server (`SOAK_PROFILE=dir`); one .pstats file per thread at shutdown."""
    import cProfile
    import threading

    profiles: dict[str, cProfile.Profile] = {}

    def start(*_: Any) -> None:
        profile = profiles.setdefault(threading.current_thread().name, cProfile.Profile())
        profile.enable()

    threading.setprofile(start)
    profiles["MainThread"] = cProfile.Profile()
    profiles["MainThread"].enable()

    async def dump(_: Any) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name, profile in list(profiles.items()):
            profile.disable()  # only stops this thread's; the others' stats are read as they are
            profile.dump_stats(str(out / f"{name}.pstats"))

    app.on_shutdown.insert(0, dump)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _soak(url: str, pid: int, prompts: int, sockets: int, drain: bool = True) -> dict[str, Any]:
    from tests.server.stubs import txt2img

    figures: dict[str, Any] = {"rss_start_mb": rss_mb(pid)}
    timeout = aiohttp.ClientTimeout(total=60)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        start = time.perf_counter()
        wss = await asyncio.gather(*(session.ws_connect(f"{url}/ws?clientId=s{i}") for i in range(sockets)))
        figures["ws_connect_s"] = time.perf_counter() - start
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        counter = iter(range(prompts))

        async def client() -> None:
            for i in counter:
                body = {"prompt": txt2img(seed=i, steps=1), "client_id": f"s{i % sockets}"}
                t0 = time.perf_counter()
                async with session.post(f"{url}/prompt", json=body) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies.append(time.perf_counter() - t0)

        cpu_before = await _cpu(session, url)
        start, own_cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        figures["post_s"] = time.perf_counter() - start
        figures["client_cpu_ms_per_post"] = 1000 * (time.process_time() - own_cpu) / prompts
        cpu_posts = await _cpu(session, url)
        figures["rss_after_posts_mb"] = rss_mb(pid)
        deadline = time.monotonic() + (600 if drain else 0)
        while time.monotonic() < deadline:
            async with session.get(f"{url}/prompt") as resp:
                if (await resp.json())["exec_info"]["queue_remaining"] == 0:
                    break
            await asyncio.sleep(0.5)
        figures["drain_s"] = time.perf_counter() - start
        cpu_drained = await _cpu(session, url)
        for name in sorted(cpu_drained):
            during = cpu_posts.get(name, 0.0) - cpu_before.get(name, 0.0)
            total = cpu_drained[name] - cpu_before.get(name, 0.0)
            if total > 0.05:
                figures[f"cpu_ms_per_prompt[{name}]"] = (
                    f"{1000 * during / prompts:.2f} while posting, {1000 * total / prompts:.2f} in all"
                )
        t0 = time.perf_counter()
        async with session.get(f"{url}/history") as resp:
            figures["history_bytes"] = len(await resp.read())
        figures["history_s"] = time.perf_counter() - t0
        heard = sum(1 for ws in wss if not ws.closed)
        figures["ws_open_at_end"] = heard
        await asyncio.gather(*(ws.close() for ws in wss))
    latencies.sort()
    figures["statuses"] = statuses
    figures["p50_ms"] = 1000 * latencies[len(latencies) // 2]
    figures["p99_ms"] = 1000 * latencies[int(len(latencies) * 0.99)]
    figures["rss_end_mb"] = rss_mb(pid)
    return figures


async def _cpu(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/_soak/threads") as resp:
        return dict(await resp.json())


def run(prompts: int = 5000, sockets: int = 500, idle_worker: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        port = _free_port()
        env = {**os.environ, "SOAK_PORT": str(port), "SOAK_IDLE_WORKER": "1" if idle_worker else ""}
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "--serve", str(base)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    with __import__("urllib.request").request.urlopen(f"{url}/queue", timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            figures = asyncio.run(_soak(url, child.pid, prompts, sockets, not idle_worker))
            db = base / "user" / "nodegraph" / "queue.sqlite3"
            wal = db.with_name(db.name + "-wal")
            figures["sqlite_mb"] = sum(p.stat().st_size for p in (db, wal) if p.exists()) / 2**20
            temp = base / "temp"
            figures["temp_files"] = len(list(temp.iterdir())) if temp.is_dir() else 0
        finally:
            child.terminate()
            child.wait(30)
    return figures


def main() -> None:
    figures = run()
    for key, value in figures.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", type=Path)
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--sockets", type=int, default=500)
    parser.add_argument("--idle-worker", action="store_true", help="run no prompt: the POSTs' own cost")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
    else:
        result = run(args.prompts, args.sockets, args.idle_worker)
        for key, value in result.items():
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
