"""Latent batch nodes: LatentFromBatch, RepeatLatentBatch (ComfyUI nodes.py: ids, inputs and arithmetic).

Every node returns a new dict (a shallow copy keeping "noise_mask" and "batch_index" unless the node
changes them) and never modifies the tensors it was given.
"""

from __future__ import annotations

import math

import torch

from nodegraph.node import Int, Node, Output, RunContext, Socket
from nodegraph.types import LATENT
from nodes.sd.values import Latent


def _masks_for_batch(masks: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a shorter mask batch to cover `batch` items (ComfyUI's cycling rule)."""
    if masks.shape[0] < batch:
        masks = masks.repeat(math.ceil(batch / masks.shape[0]), 1, 1, 1)[:batch]
    return masks


class LatentFromBatch(Node):
    """Take `length` latents starting at `batch_index`; their noise stays that of their batch position."""

    DISPLAY_NAME = "Latent From Batch"
    CATEGORY = "latent/batch"
    INPUTS = (
        Socket("samples", LATENT),
        Int("batch_index", 0, min=0, max=63),
        Int("length", 1, min=1, max=64),
    )
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, batch_index: int, length: int) -> tuple[Latent]:
        out = samples.copy()
        s_in: torch.Tensor = samples["samples"]
        batch_index = min(s_in.shape[0] - 1, batch_index)
        length = min(s_in.shape[0] - batch_index, length)
        out["samples"] = s_in[batch_index : batch_index + length].clone()
        if "noise_mask" in samples:
            masks: torch.Tensor = samples["noise_mask"]
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                masks = _masks_for_batch(masks, s_in.shape[0])
                out["noise_mask"] = masks[batch_index : batch_index + length].clone()
        if "batch_index" in samples:
            out["batch_index"] = list(samples["batch_index"][batch_index : batch_index + length])
        else:
            out["batch_index"] = list(range(batch_index, batch_index + length))
        return (out,)


class RepeatLatentBatch(Node):
    """Repeat a latent batch `amount` times; repeated items get noise of new batch positions."""

    DISPLAY_NAME = "Repeat Latent Batch"
    CATEGORY = "latent/batch"
    INPUTS = (Socket("samples", LATENT), Int("amount", 1, min=1, max=64))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, amount: int) -> tuple[Latent]:
        out = samples.copy()
        s_in: torch.Tensor = samples["samples"]
        out["samples"] = s_in.repeat((amount, 1, 1, 1))
        if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
            # ComfyUI computes the cycled masks and then repeats the original ones; kept as is
            out["noise_mask"] = samples["noise_mask"].repeat((amount, 1, 1, 1))
        if "batch_index" in samples:
            indices = list(samples["batch_index"])
            offset = max(indices) - min(indices) + 1
            out["batch_index"] = indices + [x + i * offset for i in range(1, amount) for x in indices]
        return (out,)


NODES: tuple[type[Node], ...] = (
    LatentFromBatch,
    RepeatLatentBatch,
)
