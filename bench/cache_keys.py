"""Per-output cache keys: the re-run after a LoRA `strength_model` change, with and without them.

The workflow is checkpoint -> LoraLoader -> two CLIPTextEncode -> KSampler (1 step, 64x64) ->
SaveLatent on the real nodes and the oracle's mini SD1.5 checkpoint and LoRA (tests/.cache, made
by the test fixtures). "Before" is the same graph with LoraLoader's outputs keyed by the whole node
(ComfyUI's rule, nodegraph before issue 13): each strength_model change then re-encodes both
prompts. Each engine runs a new strength_model value each time; the figures are medians over the
re-runs after a warm-up. Run: `python -m bench.cache_keys [--no-record]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import record, table
from nodegraph.engine import Engine, Settings, build_engine
from nodegraph.events import Event, Executing, ExecutionSuccess
from nodegraph.node import Node, Output
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.lora import LoraLoader

CACHE = Path(__file__).resolve().parents[1] / "tests" / ".cache"
REPEATS = 7


class WholeNodeLoraLoader(LoraLoader):
    """LoraLoader with every output keyed by all its inputs (how nodegraph keyed it before)."""

    OUTPUTS = tuple(Output(o.type, o.name, o.is_list, o.tooltip) for o in LoraLoader.OUTPUTS)


def engine(base: Path, whole_node: bool) -> Engine:
    nodes: list[type[Node]] = [n for n in all_nodes() if not (whole_node and n is LoraLoader)]
    if whole_node:
        nodes.append(WholeNodeLoraLoader)
    return build_engine(Settings(base_directory=base, preview_method="none"), nodes)


def prompt(strength_model: float) -> dict[str, Any]:
    sampler = {
        "model": ["lora", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": 1, "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
    }  # fmt: skip
    lora = {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "mini_lora_a.safetensors",
        "strength_model": strength_model, "strength_clip": 1.0,
    }  # fmt: skip
    text = "a photo of a cat sitting on a red chair, highly detailed, " * 3
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini_sd15.safetensors"}},
        "lora": {"class_type": "LoraLoader", "inputs": lora},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["lora", 1], "text": text}},
        "neg": {
            "class_type": "CLIPTextEncode",
            "inputs": {"clip": ["lora", 1], "text": "blurry, low quality"},
        },
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": sampler},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "k"}},
    }


class Timer:
    """Wall time per node class, from the executor's Executing events."""

    def __init__(self) -> None:
        self.per_class: dict[str, float] = {}
        self._current: str | None = None
        self._since = 0.0

    def __call__(self, event: Event) -> None:
        if not isinstance(event, (Executing, ExecutionSuccess)):
            return  # progress and UI events happen inside a node's time
        now = time.perf_counter()
        if self._current is not None:
            self.per_class[self._current] = self.per_class.get(self._current, 0.0) + now - self._since
        self._current = event.class_type if isinstance(event, Executing) else None
        self._since = now


def rerun(eng: Engine, strength: float) -> tuple[float, float, int]:
    """(wall s, CLIPTextEncode s, CLIPTextEncode runs) of one run at this strength_model."""
    checked = validate_prompt(prompt(strength), eng.registry, eng.env)
    assert checked.graph is not None, checked.node_errors
    timer = Timer()
    start = time.perf_counter()
    outcome = eng.executor.execute(checked.graph, "bench", timer)
    wall = time.perf_counter() - start
    assert outcome.status == "success", outcome.error
    encodes = sum(1 for n in outcome.executed if checked.graph.nodes[n].cls.NODE_ID == "CLIPTextEncode")
    return wall, timer.per_class.get("CLIPTextEncode", 0.0), encodes


def measure(base: Path) -> list[list[str]]:
    rows = []
    for label, whole in (("before: outputs keyed by the whole node", True), ("per-output keys", False)):
        eng = engine(base, whole)
        rerun(eng, 0.5)  # cold: loads the checkpoint and the LoRA
        rerun(eng, 0.9)  # warm-up of the strength-change path
        runs = [rerun(eng, 0.3 + 0.05 * i) for i in range(REPEATS)]  # a new strength each time
        rows.append(
            [
                label,
                f"{statistics.median(r[0] for r in runs) * 1e3:.0f} ms",
                f"{statistics.median(r[1] for r in runs) * 1e3:.0f} ms",
                f"{statistics.median(r[2] for r in runs):.0f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-record", action="store_true", help="print only, do not write RESULTS.md")
    args = parser.parse_args(argv)
    checkpoint, lora = CACHE / "mini_sd15.safetensors", CACHE / "loras" / "mini_lora_a.safetensors"
    if not (checkpoint.exists() and lora.exists()):
        raise SystemExit(f"{checkpoint} or {lora} is missing: run the LoRA tests once to generate them")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "models" / "checkpoints").mkdir(parents=True)
        (base / "models" / "loras").mkdir(parents=True)
        (base / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint.resolve())
        (base / "models" / "loras" / lora.name).symlink_to(lora.resolve())
        rows = measure(base)
    headers = [
        f"re-run after a strength_model change ({REPEATS} runs)",
        "median wall",
        "text encoding",
        "encodes",
    ]
    lines = table(headers, rows)
    print("\n".join(lines))
    if not args.no_record:
        record(
            "Per-output cache keys (issue 13)", ["Mini SD1.5 checkpoint, 1 step at 64x64, CPU.", "", *lines]
        )


if __name__ == "__main__":
    main()
