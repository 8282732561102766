"""LoRA training step on a full-size SD1.5-shaped UNet at 256x256: overhead and peak memory.

1. Time per training step (`LoraTrainer.train_step`: cached latents and text, noise, loss,
   backward, gradient clipping, AdamW, schedule) against a bare forward + backward of the same
   adapted UNet on the same batch (batch 1, latent 32x32, rank 16 on every transformer layer).
   Target: overhead <= 5 %.
2. Peak memory of a step above the resident model, with and without gradient checkpointing
   (each measured in its own process, by sampling the process's resident set every 2 ms; freed
   heap memory is returned to the system with `malloc_trim` before the resident set is read).

The UNet is diffusers' `UNet2DConditionModel` with SD1.5's config and random fp32 weights (860M
parameters, ~3.4 GB); the text encoder and VAE are the mini checkpoint's (full-size CLIP-L and VAE).
Run: `python -m bench.train` (several minutes on 2 cores; ~5 GB RAM at its peak).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench import record, table
from bench.sampling import sd15_unet

SIZE, REPEATS = 256, 5
MINI = Path(__file__).resolve().parent.parent / "tests" / ".cache" / "mini_sd15.safetensors"


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


class PeakRss:
    """The highest resident set size seen while active (sampled every 2 ms on a thread)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def build(checkpointing: bool) -> Any:
    """A trainer on the full-size UNet and a 4-image 256x256 dataset, latents cached."""
    from nodes.sd.checkpoint import load_checkpoint
    from nodes.train.dataset import load_dataset
    from nodes.train.trainer import LoraTrainer, TrainOptions

    models = dataclasses.replace(load_checkpoint(MINI), unet=sd15_unet().train())
    folder = Path(tempfile.mkdtemp()) / "1_bench"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    options = TrainOptions(
        rank=16, alpha=16, resolution=SIZE, train_text_encoder=False, cache_latents=True,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    trainer = LoraTrainer(models, load_dataset(folder.parent), options, torch.device("cpu"), max_steps=100)
    trainer.prepare()
    return trainer


def bare_step_s(trainer: Any) -> float:
    """One forward + backward of the adapted UNet on a batch of the trainer's shapes."""
    unet = trainer.models.unet
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8)
    cond = trainer.text(["bench"])
    t = torch.tensor([500])
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        loss = F.mse_loss(unet(x, t, encoder_hidden_states=cond).sample, x)
        loss.backward()
    elapsed = time.perf_counter() - start
    trainer.optimizer.zero_grad(set_to_none=True)
    return elapsed


def train_step_s(trainer: Any) -> float:
    batch = trainer.epoch_batches()[:1]
    start = time.perf_counter()
    trainer.train_step(batch)
    return time.perf_counter() - start


def measure(checkpointing: bool) -> dict[str, float]:
    """(in a child process) times and peak memory for one setting."""
    torch.manual_seed(0)
    trainer = build(checkpointing)
    bare_step_s(trainer)  # warm-up: allocator, first-call costs
    train_step_s(trainer)
    # glibc keeps the warm-up's freed activations mapped: hand them back, or the resident set
    # would already hold a step's working memory and the peak above it would read near zero
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    resident = _rss()
    bare, steps = [], []
    with PeakRss() as peak:
        for _ in range(REPEATS):  # interleaved, so machine load hits both alike
            bare.append(bare_step_s(trainer))
            steps.append(train_step_s(trainer))
    ratios = sorted(s / b for s, b in zip(steps, bare, strict=True))
    return {
        "bare": min(bare), "step": min(steps), "ratio": ratios[len(ratios) // 2],
        "peak": peak.peak - resident, "resident": resident,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("on", "off"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "on")))
        return
    found = {}
    for setting in ("off", "on"):
        command = [sys.executable, "-m", "bench.train", "--child", setting]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        found[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = found["off"], found["on"]

    def pct(r: dict[str, float]) -> str:
        return f"{(r['ratio'] - 1) * 100:+.1f} %"

    def gib(key: str) -> list[str]:
        return [f"{off[key] / 2**30:.2f} GiB", f"{on[key] / 2**30:.2f} GiB"]

    rows = [
        ["bare forward + backward (adapted UNet)", f"{off['bare']:.2f} s", f"{on['bare']:.2f} s", ""],
        ["train_step", f"{off['step']:.2f} s", f"{on['step']:.2f} s", ""],
        ["overhead (median of the runs' train_step / bare ratios)", pct(off), pct(on), "<= 5 %"],
        ["peak memory above the resident model", *gib("peak"), ""],
        ["resident (models, adapters)", *gib("resident"), ""],
    ]
    lines = [
        f"Full-size SD1.5-shaped UNet (random fp32), {SIZE}x{SIZE}, batch 1, rank 16 UNet-only LoRA, "
        f"cached latents and text, fp32 on the CPU; fastest of {REPEATS} interleaved runs.",
        "",
        *table(["", "checkpointing off", "checkpointing on", "target"], rows),
    ]
    print("\n".join(lines))
    if not args.no_record:
        record("LoRA training (issue 11)", lines)


if __name__ == "__main__":
    main()
