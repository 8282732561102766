"""Conditioning nodes: ConditioningAverage, ConditioningConcat, ConditioningSetTimestepRange (nodes.py).

Entries are `[embedding [1, T, 768], options]`; new lists and option dicts are built, inputs are
never mutated. Timestep ranges are honoured by nodes/sd/guidance.py (`start_percent`/`end_percent`).
"""

from __future__ import annotations

import torch

from nodegraph.node import Float, Node, Output, RunContext, Socket
from nodegraph.types import CONDITIONING
from nodes.sd.values import Conditioning


def _first_only(ctx: RunContext, node: str, conditioning_from: Conditioning) -> None:
    if len(conditioning_from) > 1:
        ctx.warn(
            f"Warning: {node} conditioning_from contains more than 1 cond, only the first one will "
            "actually be applied to conditioning_to."
        )


class ConditioningAverage(Node):
    """Interpolate embeddings: to·strength + from·(1 − strength); `from` is cut or zero-padded to `to`."""

    # ComfyUI maps "ConditioningAverage " (trailing space), so its canvas shows the class name
    DISPLAY_NAME = "ConditioningAverage"
    CATEGORY = "conditioning"
    INPUTS = (
        Socket("conditioning_to", CONDITIONING),
        Socket("conditioning_from", CONDITIONING),
        Float("conditioning_to_strength", 1.0, min=0.0, max=1.0, step=0.01),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        conditioning_to: Conditioning,
        conditioning_from: Conditioning,
        conditioning_to_strength: float,
    ) -> tuple[Conditioning]:
        _first_only(ctx, "ConditioningAverage", conditioning_from)
        strength = conditioning_to_strength
        cond_from: torch.Tensor = conditioning_from[0][0]
        pooled_from = conditioning_from[0][1].get("pooled_output", None)
        out: Conditioning = []
        for t1, options in conditioning_to:
            pooled_to = options.get("pooled_output", pooled_from)
            t0 = cond_from[:, : t1.shape[1]]
            if t0.shape[1] < t1.shape[1]:
                pad = torch.zeros(
                    (1, t1.shape[1] - t0.shape[1], t1.shape[2]), dtype=t0.dtype, device=t0.device
                )
                t0 = torch.cat([t0, pad], dim=1)
            mixed = torch.mul(t1, strength) + torch.mul(t0, 1.0 - strength)
            new_options = options.copy()
            if pooled_from is not None and pooled_to is not None:
                new_options["pooled_output"] = torch.mul(pooled_to, strength) + torch.mul(
                    pooled_from, 1.0 - strength
                )
            elif pooled_from is not None:
                new_options["pooled_output"] = pooled_from
            out.append((mixed, new_options))
        return (out,)


class ConditioningConcat(Node):
    """Append the first `conditioning_from` embedding to each `conditioning_to` embedding (token axis)."""

    DISPLAY_NAME = "Conditioning (Concat)"
    CATEGORY = "conditioning"
    INPUTS = (Socket("conditioning_to", CONDITIONING), Socket("conditioning_from", CONDITIONING))
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self, ctx: RunContext, conditioning_to: Conditioning, conditioning_from: Conditioning
    ) -> tuple[Conditioning]:
        _first_only(ctx, "ConditioningConcat", conditioning_from)
        cond_from: torch.Tensor = conditioning_from[0][0]
        return ([(torch.cat((t1, cond_from), 1), options.copy()) for t1, options in conditioning_to],)


class ConditioningSetTimestepRange(Node):
    """Apply the conditioning only between `start` and `end` (fractions of the sampling schedule)."""

    CATEGORY = "advanced/conditioning"
    INPUTS = (
        Socket("conditioning", CONDITIONING),
        Float("start", 0.0, min=0.0, max=1.0, step=0.001),
        Float("end", 1.0, min=0.0, max=1.0, step=0.001),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self, ctx: RunContext, conditioning: Conditioning, start: float, end: float
    ) -> tuple[Conditioning]:
        return (
            [
                (cond, {**options, "start_percent": start, "end_percent": end})
                for cond, options in conditioning
            ],
        )


NODES: tuple[type[Node], ...] = (ConditioningAverage, ConditioningConcat, ConditioningSetTimestepRange)
