"""Nodes: RebatchLatents and RebatchImages (comfy_extras/nodes_rebatch.py), ComfyUI's list nodes.

Both take every batch that reaches them as one list (INPUT_IS_LIST: a list output upstream gives
several) and give a list of batches of `batch_size` (a list output): the nodes after them run once
per batch (`nodegraph.value_lists`). A VAE decode of a large batch in smaller pieces, or a sampler
over batches of different sizes, are the usual uses.

RebatchLatents, step by step as ComfyUI does it:

1. Each latent of the list becomes (samples, mask, batch indices): its noise mask or ones at pixel
   size [b, 1, 8h, 8w] (a shorter mask batch cycled to the samples'), its `batch_index` or the
   running count of samples before it plus 0..b-1.
2. Latents of one spatial size are concatenated; a latent of another size first closes the batch
   collected so far (as one output, at most `batch_size`).
3. Whenever the collection holds more than `batch_size` samples, its whole `batch_size` slices
   become outputs and the remainder carries on; what is left at the end is the last output.
4. An output's mask that is all ones is dropped (the latent had no noise mask). Other keys of the
   input latents are not kept.
"""

from __future__ import annotations

import torch

from nodegraph.node import Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE, LATENT
from nodes.sd.values import Latent

# (samples [b, 4, h, w], mask [b, 1, 8h, 8w], batch indices)
_Batch = tuple[torch.Tensor, torch.Tensor, list[int]]


def _entry(latent: Latent, offset: int) -> _Batch:
    samples = latent["samples"]
    b, _, h, w = samples.shape
    mask = latent.get("noise_mask")
    if mask is None:
        mask = torch.ones((b, 1, h * 8, w * 8))
    if mask.shape[0] < b:
        mask = mask.repeat((b - 1) // mask.shape[0] + 1, 1, 1, 1)[:b]
    indices = list(latent["batch_index"]) if "batch_index" in latent else list(range(offset, offset + b))
    return samples, mask, indices


def _output(batch: _Batch, start: int, size: int) -> Latent:
    samples, mask, indices = batch
    return {
        "samples": samples[start : start + size],
        "noise_mask": mask[start : start + size],
        "batch_index": indices[start : start + size],
    }


def _join(a: _Batch, b: _Batch) -> _Batch:
    return torch.cat((a[0], b[0])), torch.cat((a[1], b[1])), a[2] + b[2]


def rebatch_latents(latents: list[Latent], batch_size: int) -> list[Latent]:
    """ComfyUI's LatentRebatch.rebatch (see the module docstring for the steps)."""
    out: list[Latent] = []
    current: _Batch | None = None
    seen = 0
    for latent in latents:
        entry = _entry(latent, seen)
        seen += len(entry[2])
        if current is None:
            current = entry
        elif entry[0].shape[-2:] != current[0].shape[-2:]:
            out.append(_output(current, 0, batch_size))
            current = entry
        else:
            current = _join(current, entry)
        count = current[0].shape[0]
        if count > batch_size:
            whole = count // batch_size
            out += [_output(current, i * batch_size, batch_size) for i in range(whole)]
            rest = whole * batch_size
            current = (current[0][rest:], current[1][rest:], current[2][rest:]) if rest < count else None
    if current is not None:
        out.append(_output(current, 0, batch_size))
    for latent in out:
        if float(latent["noise_mask"].mean()) == 1.0:
            del latent["noise_mask"]
    return out


class RebatchLatents(Node):
    """Regroup the latent batches that reach it into batches of batch_size; later nodes run per batch."""

    DISPLAY_NAME = "Rebatch Latents"
    CATEGORY = "latent/batch"
    INPUT_IS_LIST = True
    INPUTS = (Socket("latents", LATENT), Int("batch_size", 1, min=1, max=4096))
    OUTPUTS = (Output(LATENT, is_list=True),)

    def run(self, ctx: RunContext, latents: list[Latent], batch_size: list[int]) -> tuple[list[Latent]]:
        return (rebatch_latents(latents, batch_size[0]),)


class RebatchImages(Node):
    """Regroup the image batches that reach it into batches of batch_size; later nodes run per batch."""

    DISPLAY_NAME = "Rebatch Images"
    CATEGORY = "image/batch"
    INPUT_IS_LIST = True
    INPUTS = (Socket("images", IMAGE), Int("batch_size", 1, min=1, max=4096))
    OUTPUTS = (Output(IMAGE, is_list=True),)

    def run(
        self, ctx: RunContext, images: list[torch.Tensor], batch_size: list[int]
    ) -> tuple[list[torch.Tensor]]:
        size = batch_size[0]
        singles = [image[i : i + 1] for image in images for i in range(image.shape[0])]
        return ([torch.cat(singles[i : i + size], dim=0) for i in range(0, len(singles), size)],)


NODES: tuple[type[Node], ...] = (RebatchLatents, RebatchImages)
