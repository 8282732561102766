"""Headless Chromium against a real nodegraph server on a loopback port, shared by the canvas tests.

One server and one browser page per module: the tests run in order, as one user session would
(graph loads, LoRA is added and wired, the prompt runs, the workflow is saved and reopened).
Screenshots go to tests/artifacts/ (gitignored) so a person can look at what the browser saw.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors.numpy
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]  # fmt: skip
# ComfyUI frontend 1.27.10 throws this once at boot from a settings onChange hook; harmless
# (docs: shared/reference/canvas.md, pitfall 5). Any other page error fails the tests.
KNOWN_PAGE_ERRORS = ("Cannot read properties of undefined (reading 'id')",)
TRIGGER_WORDS = "cattail style, red chair"


def chromium_executable() -> str:
    for path in CHROMIUM_PATHS:
        if Path(path).is_file():
            return path
    pytest.fail("no chromium found: install it with `apt-get install -y chromium` (.ci/run does this)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def canvas_base(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_loras: Path) -> Path:
    """A base directory with the mini checkpoint and LoRAs; LoRA a carries trigger words and a preview."""
    base = tmp_path_factory.mktemp("canvas")
    (base / "models" / "checkpoints").mkdir(parents=True)
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    shutil.copy(mini_checkpoint, base / "models" / "checkpoints" / "mini_sd15.safetensors")
    tensors = safetensors.numpy.load_file(str(mini_loras / "mini_lora_a.safetensors"))
    meta = {"ss_network_dim": "4", "ss_network_alpha": "4", "modelspec.trigger_phrase": TRIGGER_WORDS}
    safetensors.numpy.save_file(tensors, str(loras / "mini_lora_a.safetensors"), metadata=meta)
    Image.new("RGB", (32, 32), (30, 110, 200)).save(loras / "mini_lora_a.preview.png")
    shutil.copy(mini_loras / "mini_lora_b.safetensors", loras / "mini_lora_b.safetensors")
    # One module that names no layer of the model: the LoRA applies in part and the engine warns.
    stray = "lora_unet_no_such_block_attn9"
    tensors[f"{stray}.lora_down.weight"] = tensors[next(k for k in tensors if k.endswith("down.weight"))]
    tensors[f"{stray}.lora_up.weight"] = tensors[next(k for k in tensors if k.endswith("up.weight"))]
    partial = loras / "partial_lora.safetensors"
    safetensors.numpy.save_file(tensors, str(partial), metadata={"ss_network_dim": "4"})
    return base


def server_command(base: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "nodegraph", "serve",
        "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def canvas_server(canvas_base: Path) -> Iterator[str]:
    """The real server (`python -m nodegraph serve`) on a free loopback port; yields its URL."""
    with serving(canvas_base) as url:
        yield url


@contextmanager
def serving(canvas_base: Path, *extra: str) -> Iterator[str]:
    """`python -m nodegraph serve` (with `extra` flags) on a free loopback port, until the block ends."""
    port = free_port()
    log = open(canvas_base / "server.log", "wb")  # noqa: SIM115 - closed below, read on failure
    command = [*server_command(canvas_base, port), *extra]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core CI machine can take a minute to import torch
        while True:
            try:
                with urllib.request.urlopen(url + "/api/object_info", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                output = (canvas_base / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"the server did not start (exit {proc.poll()}):\n{output}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@dataclass
class Session:
    """The browser page and what it saw."""

    page: Any
    url: str
    base: Path
    page_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def fit_view(self) -> None:
        # Images load only for nodes on screen (canvas.md pitfall 4): fit everything first.
        self.js(
            "() => { app.canvas.deselectAll(); app.extensionManager.command.execute('Comfy.Canvas.FitView') }"
        )
        self.page.wait_for_timeout(300)


# Module scope: Playwright's sync API keeps an event loop running in this thread while it is open,
# which would break every asyncio test collected after this module.
@pytest.fixture(scope="module")
def canvas(canvas_server: str, canvas_base: Path) -> Iterator[Session]:
    """One Chromium page on the canvas, with the default graph drawn."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        session = Session(page, canvas_server, canvas_base)
        page.on("pageerror", lambda e: session.page_errors.append(str(e)))

        def on_request(request: Any) -> None:
            if not request.url.startswith((canvas_server, "blob:", "data:", "ws://127.0.0.1")):
                session.outside_requests.append(request.url)
            if request.method == "POST" and request.url.endswith("/api/prompt"):
                session.prompts.append(json.loads(request.post_data or "{}"))

        page.on("request", on_request)
        page.goto(canvas_server + "/", timeout=180_000)
        page.wait_for_function("() => window.app?.graph?.nodes?.length >= 8", timeout=180_000)
        try:
            yield session
        finally:
            browser.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failed canvas test, keep a screenshot of what the browser showed."""
    outcome = yield
    report = outcome.get_result()
    session = getattr(item, "funcargs", {}).get("canvas")
    if report.when == "call" and report.failed and isinstance(session, Session):
        try:
            session.shot(f"failed-{item.name}")
        except Exception:  # noqa: BLE001 - a screenshot must not hide the real failure
            pass
