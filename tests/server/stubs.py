"""Stub nodes and an engine built from them: the server's tests need no torch and no model.

The stubs mimic a txt2img graph: Seed -> Sampler (reports steps, optional preview) -> Save
(writes a real PNG into output/ and returns ComfyUI's `{"images": [...]}` UI). `RUNS` counts how
often each class ran, so tests can see what the cache spared.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from nodegraph.engine import Engine, Settings, build_engine
from nodegraph.node import Float, Int, Node, Output, Preview, Result, RunContext, Socket, String
from nodegraph.types import IMAGE, LATENT

RUNS: Counter[str] = Counter()
_runs_lock = threading.Lock()


def _count(name: str) -> None:
    with _runs_lock:
        RUNS[name] += 1


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, format="JPEG")
    return out.getvalue()


class StubSeed(Node):
    """Make a stand-in latent from a seed."""

    CATEGORY = "test"
    INPUTS = (Int("seed", 0, min=0, max=2**32),)
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, seed: int) -> tuple[Any, ...]:
        _count("StubSeed")
        return ({"seed": seed},)


class StubSampler(Node):
    """Pretend to sample: one progress step per `steps`, `delay` seconds each, with a preview."""

    CATEGORY = "test"
    INPUTS = (
        Socket("latent", socket_type=LATENT),
        Int("seed", 0, min=0, max=2**32),
        Int("steps", 2, min=1, max=1000),
        Float("delay", 0.0, min=0.0, max=10.0),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, latent: Any, seed: int, steps: int, delay: float) -> tuple[Any, ...]:
        _count("StubSampler")
        preview = Preview("image/jpeg", _jpeg())
        for step in range(steps):
            if delay:
                time.sleep(delay)
            ctx.progress(step + 1, steps, preview=preview if step == 0 else None)
        return ((latent["seed"], seed),)


class StubSave(Node):
    """Save a small PNG and show it."""

    CATEGORY = "test"
    OUTPUT_NODE = True
    INPUTS = (Socket("images", socket_type=IMAGE), String("filename_prefix", "stub"))
    OUTPUTS = ()

    def run(self, ctx: RunContext, images: Any, filename_prefix: str) -> Result:
        _count("StubSave")
        out_dir = Path(ctx.env.folders.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"{filename_prefix}_{images[0]}_{images[1]}_.png"
        Image.new("RGBA", (4, 4), (0, 128, 255, 100)).save(out_dir / name)
        ctx.warn("stub warning", {"why": "test"})
        return Result((), {"images": [{"filename": name, "subfolder": "", "type": "output"}]})


class StubFail(Node):
    """Fail on purpose."""

    CATEGORY = "test"
    OUTPUT_NODE = True
    INPUTS = (String("message", "boom"),)
    OUTPUTS = ()

    def run(self, ctx: RunContext, message: str) -> tuple[Any, ...]:
        raise RuntimeError(message)


STUBS: list[type[Node]] = [StubSeed, StubSampler, StubSave, StubFail]


def txt2img(seed: int = 1, steps: int = 2, delay: float = 0.0, prefix: str = "stub") -> dict[str, Any]:
    """An API-format prompt over the stubs."""
    return {
        "1": {"class_type": "StubSeed", "inputs": {"seed": 7}},
        "2": {
            "class_type": "StubSampler",
            "inputs": {"latent": ["1", 0], "seed": seed, "steps": steps, "delay": delay},
        },
        "3": {"class_type": "StubSave", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def make_engine(
    base: Path,
    *,
    listen: str = "127.0.0.1",
    auth_token: str | None = None,
    more_nodes: tuple[type[Node], ...] = (),
    **extra: Any,
) -> Engine:
    """An engine over the stub nodes (and a test's own `more_nodes`) with its folders under `base`."""
    settings = Settings(base_directory=base, listen=listen, auth_token=auth_token, port=0, **extra)
    engine = build_engine(settings, nodes=[*STUBS, *more_nodes])
    folders = engine.env.folders
    for d in (folders.output_dir, folders.input_dir, folders.temp_dir, folders.user_dir):
        d.mkdir(parents=True, exist_ok=True)
    return engine
