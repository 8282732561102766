"""Which worker runs a prompt: the one that already holds its models, else an idle one.

Torch-free and Ray-free, so the policy is tested (and benchmarked on a simulated trace) without a
cluster. A model is named by the sha256 of its file's content: the same file under two names, or
on two machines, is one model.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Inputs whose value names a model file, and the folder it lives in (ComfyUI's input names).
MODEL_INPUTS: Mapping[str, str] = {
    "ckpt_name": "checkpoints",
    "lora_name": "loras",
    "vae_name": "vae",
    "unet_name": "diffusion_models",
    "control_net_name": "controlnet",
    "model_name": "upscale_models",
    "clip_name": "text_encoders",
    "hypernetwork_name": "hypernetworks",
}
# A checkpoint costs seconds to load; a LoRA a fraction of that: a worker holding the checkpoint
# wins over one holding only the LoRAs.
WEIGHTS: Mapping[str, int] = {"checkpoints": 100, "diffusion_models": 100}
CHUNK = 1 << 20
HOLDS = 100  # a worker "holds" a prompt's models when it has at least its checkpoint
MAX_BACKLOG = 1  # prompts that may wait behind the one a worker runs, for the sake of its checkpoint


@dataclass
class WorkerView:
    """What the router knows of one worker: prompts given to it and unfinished, and which models it
    holds (least recently used first)."""

    name: str
    load: int = 0  # the prompt it runs plus those waiting for it
    capacity: int = 4  # models kept per worker before the oldest is assumed evicted
    holds: OrderedDict[str, int] = field(default_factory=OrderedDict)

    @property
    def idle(self) -> bool:
        return self.load == 0

    def remember(self, models: Mapping[str, int]) -> None:
        """It runs a prompt with these models: they are now the most recently used."""
        for key, weight in models.items():
            self.holds.pop(key, None)
            self.holds[key] = weight
        while len(self.holds) > self.capacity:
            self.holds.popitem(last=False)

    def overlap(self, models: Mapping[str, int]) -> int:
        return sum(weight for key, weight in models.items() if key in self.holds)


def choose_worker(
    models: Mapping[str, int], workers: Sequence[WorkerView], max_backlog: int = MAX_BACKLOG
) -> WorkerView | None:
    """The worker to run a prompt needing `models` (content hash -> weight), or None to wait.

    1. A worker that holds the prompt's checkpoint (the most of its models, by weight), idle or with
       fewer than `max_backlog` prompts waiting behind the one it runs: waiting one prompt's run is
       cheaper than loading the checkpoint again elsewhere;
    2. else an idle worker, the one holding the fewest models (an empty worker before one whose
       models another prompt may want), then the first in order;
    3. else None: every worker is busy.
    """
    order = {id(w): i for i, w in enumerate(workers)}
    holders = [w for w in workers if w.overlap(models) >= HOLDS and w.load <= max_backlog]
    if holders:
        return max(holders, key=lambda w: (w.overlap(models), -w.load, -order[id(w)]))
    idle = [w for w in workers if w.idle]
    if not idle:
        return None
    return max(idle, key=lambda w: (w.overlap(models), -len(w.holds), -order[id(w)]))


def round_robin(workers: Sequence[WorkerView], counter: list[int]) -> WorkerView | None:
    """The baseline a plain balancer gives: the next idle worker in turn, whatever it holds."""
    for step in range(len(workers)):
        worker = workers[(counter[0] + step) % len(workers)]
        if worker.idle:
            counter[0] = (counter[0] + step + 1) % len(workers)
            return worker
    return None


def referenced_models(prompt: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(folder, name) of every model file a prompt's constant inputs name."""
    found: list[tuple[str, str]] = []
    for node in prompt.values():
        inputs = node.get("inputs", {}) if isinstance(node, Mapping) else {}
        for key, value in inputs.items() if isinstance(inputs, Mapping) else ():
            folder = MODEL_INPUTS.get(str(key))
            if folder is not None and isinstance(value, str) and value and value != "None":
                found.append((folder, value))
    return found


class ContentHashes:
    """sha256 of model files, computed once per (path, size, mtime) and kept in memory."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def of(self, path: Path) -> str:
        info = path.stat()
        key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            return known
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            self._known[key] = value
        return value

    def models(self, refs: Iterable[tuple[str, str]], resolve: Any) -> dict[str, int]:
        """Content hash -> routing weight for each resolvable (folder, name); unknown files are skipped
        (the prompt's own validation reports them)."""
        out: dict[str, int] = {}
        for folder, name in refs:
            try:
                path = resolve(folder, name)
                out[self.of(path)] = WEIGHTS.get(folder, 1)
            except (OSError, ValueError):
                continue
        return out
