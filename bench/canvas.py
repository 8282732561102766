"""Canvas benchmark: what a person waits for in the browser.

1. Cold page load (fresh browser context, empty cache) until the default graph is drawn: time,
   requests and bytes the frontend fetches from our server.
2. Run on the demo models with the default workflow (128x128, 8 steps): click Run until the image
   shows, first with the models still on disk, then again with them loaded.

Headless Debian chromium (Playwright with `executable_path`), server in a child process on loopback.
Prints a table and appends it to bench/RESULTS.md under "## Canvas (issue 6)".

    python -m bench.canvas [--loads 3] [--no-record]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import record, table

AREA = "Canvas (issue 6)"
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(
    (p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if Path(p).is_file()), "/usr/bin/chromium"
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
]
FIT_VIEW = "() => { app.canvas.deselectAll(); app.extensionManager.command.execute('Comfy.Canvas.FitView') }"
DRAWN = "() => window.app?.graph?.nodes?.length >= 8"
IMAGE = """() => { const n = app.graph.nodes.find(n => n.type === 'SaveImage');
  return n?.imgs?.[0]?.complete && n.imgs[0].naturalWidth > 0 ? n.imgs[0].src : null }"""


def _start_server(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "nodegraph", "serve", "--port", str(port), "--base-directory", str(base)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/api/object_info", timeout=5).close()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start; try `python -m nodegraph serve` to see why")


def _cold_load(browser: Any, url: str) -> tuple[float, int, int]:
    """Seconds to a drawn graph, requests made and bytes received, in a fresh context."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    sizes: list[int] = []
    page.on("response", lambda r: sizes.append(int(r.headers.get("content-length") or 0)))
    start = time.perf_counter()
    page.goto(url + "/")
    page.wait_for_function(DRAWN, timeout=120_000)
    elapsed = time.perf_counter() - start
    context.close()
    return elapsed, len(sizes), sum(sizes)


def _run_to_image(page: Any, previous: str | None) -> tuple[float, str]:
    start = time.perf_counter()
    page.click("[data-testid='queue-button'] button, button[data-testid='queue-button']")
    check = f"previous => {{ const src = ({IMAGE})(); return src && src !== previous }}"
    page.wait_for_function(check, arg=previous, timeout=600_000)
    return time.perf_counter() - start, page.evaluate(IMAGE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=3, help="cold page loads to time")
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch RESULTS.md")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from nodegraph.folders import Folders
    from nodes.demo import write_demo_models

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        write_demo_models(Folders.at(base))
        proc, url = _start_server(base)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                loads = [_cold_load(browser, url) for _ in range(args.loads)]
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(url + "/")
                page.wait_for_function(DRAWN, timeout=120_000)
                page.evaluate(FIT_VIEW)
                first, src = _run_to_image(page, None)
                second, _ = _run_to_image(page, src)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    seconds = [load[0] for load in loads]
    median, best = statistics.median(seconds), min(seconds)
    rows = [
        [f"cold load to drawn graph ({len(loads)} loads)", f"median {median:.2f} s, best {best:.2f} s"],
        ["requests / bytes per cold load", f"{loads[0][1]} / {loads[0][2] / 1e6:.1f} MB on the wire (gzip)"],
        ["Run to image, demo model 128x128 8 steps, first run (loads the models)", f"{first:.1f} s"],
        ["Run to image, same graph again (models loaded, new seed)", f"{second:.1f} s"],
    ]  # fmt: skip
    from nodegraph.server.frontend import FRONTEND_VERSION

    head = "`python -m bench.canvas` — headless chromium, server in a child process, frontend"
    lines = [f"{head} {FRONTEND_VERSION}", ""]
    lines += table(["measure", "value"], rows)
    print("\n".join(lines))
    if not args.no_record:
        record(AREA, lines)


if __name__ == "__main__":
    main()
