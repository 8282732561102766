"""Latent arithmetic: LatentAdd, LatentSubtract, LatentMultiply, LatentInterpolate, LatentBatch and
LatentBatchSeedBehavior (comfy_extras/nodes_latent.py: ids, inputs and formulas).

Each returns a shallow copy of its first latent (its `noise_mask` and `batch_index` kept) with new
samples; a second latent of another size is first resized to the first's (bilinear, centre crop)
and its batch cut or tiled to the first's (ComfyUI's `reshape_latent_to`).
"""

from __future__ import annotations

import torch

from nodegraph.node import Combo, Float, Node, Output, RunContext, Socket
from nodegraph.types import LATENT
from nodes.sd.latent_ops import common_upscale, repeat_to_batch_size
from nodes.sd.values import Latent


def _samples(node: str, name: str, latent: Latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ValueError(f"{node}: input {name} is not a latent batch [B, C, H, W]")
    return samples


def reshape_latent_to(
    node: str, shape: torch.Size, latent: torch.Tensor, repeat_batch: bool = True
) -> torch.Tensor:
    """ComfyUI's reshape_latent_to: resize to `shape`'s H, W (bilinear, centre crop), then the batch."""
    if latent.shape[1] != shape[1]:
        raise ValueError(
            f"{node}: samples2 has {latent.shape[1]} channels and samples1 {shape[1]}; "
            "latents of one model family only"
        )
    if latent.shape[1:] != shape[1:]:
        latent = common_upscale(latent, shape[-1], shape[-2], "bilinear", "center")
    return repeat_to_batch_size(latent, shape[0]) if repeat_batch else latent


class LatentAdd(Node):
    """Add two latents (samples2 resized and batched to samples1)."""

    CATEGORY = "latent/advanced"
    INPUTS = (Socket("samples1", LATENT), Socket("samples2", LATENT))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples1: Latent, samples2: Latent) -> tuple[Latent]:
        s1 = _samples("LatentAdd", "samples1", samples1)
        s2 = reshape_latent_to("LatentAdd", s1.shape, _samples("LatentAdd", "samples2", samples2))
        out = samples1.copy()
        out["samples"] = s1 + s2
        return (out,)


class LatentSubtract(Node):
    """Subtract samples2 from samples1 (samples2 resized and batched to samples1)."""

    CATEGORY = "latent/advanced"
    INPUTS = (Socket("samples1", LATENT), Socket("samples2", LATENT))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples1: Latent, samples2: Latent) -> tuple[Latent]:
        s1 = _samples("LatentSubtract", "samples1", samples1)
        s2 = reshape_latent_to("LatentSubtract", s1.shape, _samples("LatentSubtract", "samples2", samples2))
        out = samples1.copy()
        out["samples"] = s1 - s2
        return (out,)


class LatentMultiply(Node):
    """Multiply a latent by a number."""

    CATEGORY = "latent/advanced"
    INPUTS = (Socket("samples", LATENT), Float("multiplier", 1.0, min=-10.0, max=10.0, step=0.01))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, multiplier: float) -> tuple[Latent]:
        out = samples.copy()
        out["samples"] = _samples("LatentMultiply", "samples", samples) * multiplier
        return (out,)


class LatentInterpolate(Node):
    """Blend two latents' directions and magnitudes per pixel (ratio is samples1's share)."""

    CATEGORY = "latent/advanced"
    INPUTS = (
        Socket("samples1", LATENT),
        Socket("samples2", LATENT),
        Float("ratio", 1.0, min=0.0, max=1.0, step=0.01),
    )
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples1: Latent, samples2: Latent, ratio: float) -> tuple[Latent]:
        s1 = _samples("LatentInterpolate", "samples1", samples1)
        s2 = reshape_latent_to(
            "LatentInterpolate", s1.shape, _samples("LatentInterpolate", "samples2", samples2)
        )
        # ComfyUI divides [B, C, H, W] by the [B, H, W] channel norms as they broadcast (trailing
        # dimensions), which is the per-pixel norm for a batch of one; kept as is.
        m1 = torch.linalg.vector_norm(s1, dim=1)
        m2 = torch.linalg.vector_norm(s2, dim=1)
        try:
            n1, n2 = torch.nan_to_num(s1 / m1), torch.nan_to_num(s2 / m2)
            t = n1 * ratio + n2 * (1.0 - ratio)
            st = torch.nan_to_num(t / torch.linalg.vector_norm(t, dim=1))
            result = st * (m1 * ratio + m2 * (1.0 - ratio))
        except RuntimeError as exc:
            raise ValueError(
                f"LatentInterpolate: a batch of {s1.shape[0]} does not fit ComfyUI's formula, which "
                "works on one latent at a time; split the batch (LatentFromBatch)"
            ) from exc
        out = samples1.copy()
        out["samples"] = result
        return (out,)


class LatentBatch(Node):
    """Join two latent batches into one (samples2 resized to samples1)."""

    CATEGORY = "latent/batch"
    INPUTS = (Socket("samples1", LATENT), Socket("samples2", LATENT))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples1: Latent, samples2: Latent) -> tuple[Latent]:
        s1 = _samples("LatentBatch", "samples1", samples1)
        s2 = reshape_latent_to("LatentBatch", s1.shape, _samples("LatentBatch", "samples2", samples2), False)
        out = samples1.copy()
        out["samples"] = torch.cat((s1, s2), dim=0)
        first = samples1.get("batch_index", list(range(s1.shape[0])))
        out["batch_index"] = list(first) + list(samples2.get("batch_index", list(range(s2.shape[0]))))
        return (out,)


class LatentBatchSeedBehavior(Node):
    """fixed: every latent of the batch gets the first one's noise; random: each its own."""

    CATEGORY = "latent/advanced"
    INPUTS = (Socket("samples", LATENT), Combo("seed_behavior", choices=("random", "fixed"), default="fixed"))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, samples: Latent, seed_behavior: str) -> tuple[Latent]:
        latent = _samples("LatentBatchSeedBehavior", "samples", samples)
        out = samples.copy()
        if seed_behavior == "random":
            out.pop("batch_index", None)
        else:
            first = samples.get("batch_index", [0])[0]
            out["batch_index"] = [first] * latent.shape[0]
        return (out,)


NODES: tuple[type[Node], ...] = (
    LatentAdd,
    LatentSubtract,
    LatentMultiply,
    LatentInterpolate,
    LatentBatch,
    LatentBatchSeedBehavior,
)
