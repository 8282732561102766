"""Checkpoint loads saved by routing on model, against round-robin, on a simulated trace.

1,000 prompts over 5 checkpoints (Zipf-like popularity, as a shared server sees: one or two
favourite models and a tail) drained by 8 stub workers that count their loads. The dispatcher is
the server's own policy (`nodegraph.server.routing.choose_worker`), run in simulated time: a
checkpoint load costs LOAD_S, a prompt RUN_S, a worker keeps CAPACITY checkpoints (VRAM).

    python -m bench.ray_routing [--prompts 1000] [--workers 8] [--checkpoints 5] [--capacity 1]
"""

from __future__ import annotations

import argparse
import heapq
import random
from collections.abc import Callable, Sequence
from typing import Any

from nodegraph.server.routing import WorkerView, choose_worker, round_robin

LOAD_S = 6.0  # an SDXL checkpoint from disk to GPU
RUN_S = 4.0  # a 1024x1024 SDXL prompt


def trace(prompts: int, checkpoints: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(checkpoints)]
    return rng.choices([f"ckpt-{i}" for i in range(checkpoints)], weights=weights, k=prompts)


Picker = Callable[[dict[str, int], Sequence[WorkerView]], WorkerView | None]


def simulate(prompts: list[str], workers: int, capacity: int, pick: Picker) -> tuple[int, float]:
    """Dispatch the queue in order as the server does: the head prompt is taken once some worker is
    idle and given to the worker `pick` returns (which may queue it behind a busy holder).

    Returns (checkpoint loads, time to drain the queue in simulated seconds).
    """
    views = [WorkerView(f"w{i}", capacity=capacity) for i in range(workers)]
    free_at = [0.0] * workers
    done: list[tuple[float, int]] = []  # (time a prompt finishes, worker index)
    now, loads = 0.0, 0
    for ckpt in prompts:
        models = {ckpt: 100}
        while not any(v.idle for v in views) or (view := pick(models, views)) is None:
            now, index = heapq.heappop(done)
            views[index].load -= 1
        index = views.index(view)
        cost = RUN_S
        if ckpt not in view.holds:
            loads += 1
            cost += LOAD_S
        view.remember(models)
        view.load += 1
        free_at[index] = max(now, free_at[index]) + cost
        heapq.heappush(done, (free_at[index], index))
    return loads, max(free_at)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--checkpoints", type=int, default=5)
    args = parser.parse_args(argv)
    prompts = trace(args.prompts, args.checkpoints)
    print(f"{args.prompts} prompts, {args.checkpoints} checkpoints, {args.workers} workers")
    print("| models kept per worker | policy | checkpoint loads | time to drain (sim. s) |")
    print("| --- | --- | --- | --- |")
    for capacity in (1, 2):
        counter = [0]

        def rr_pick(_models: dict[str, int], views: Sequence[WorkerView], turn: list[int] = counter) -> Any:
            return round_robin(views, turn)

        rr = simulate(prompts, args.workers, capacity, rr_pick)
        routed = simulate(prompts, args.workers, capacity, choose_worker)
        print(f"| {capacity} | round-robin | {rr[0]} | {rr[1]:.0f} |")
        print(f"| {capacity} | by model (nodegraph) | {routed[0]} | {routed[1]:.0f} |")


if __name__ == "__main__":
    main()
