"""Regional prompts: ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaStrength,
ConditioningSetMask (ComfyUI nodes.py).

These nodes only write options on each entry (`node_helpers.conditioning_set_values`): "area" as
(h, w, y, x) in latent pixels (image pixels // 8) or ("percentage", h, w, y, x), "strength",
"mask", "mask_strength" and "set_area_to_bounds". nodes/sd/guidance.py turns them into crops and
weights while sampling.
"""

from __future__ import annotations

import torch

from nodegraph.node import MAX_RESOLUTION, Combo, Float, Int, Node, Output, RunContext, Socket
from nodegraph.types import CONDITIONING, MASK
from nodes.sd.values import Conditioning, CondOptions


def set_values(conditioning: Conditioning, values: CondOptions) -> Conditioning:
    """A new conditioning whose entries carry `values` in copies of their option dicts."""
    out: Conditioning = []
    for item in conditioning if isinstance(conditioning, (list, tuple)) else [None]:
        if not isinstance(item, (list, tuple)) or not item or not isinstance(item[0], torch.Tensor):
            raise ValueError(
                "conditioning: an entry is not [embedding, options]; connect a CLIPTextEncode output"
            )
        options: CondOptions = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
        out.append((item[0], {**options, **values}))
    return out


def _strength() -> Float:
    return Float("strength", 1.0, min=0.0, max=10.0, step=0.01)


class ConditioningSetArea(Node):
    """Limit a conditioning to a rectangle of the image (in pixels, multiples of 8)."""

    DISPLAY_NAME = "Conditioning (Set Area)"
    CATEGORY = "conditioning"
    INPUTS = (
        Socket("conditioning", CONDITIONING),
        Int("width", 64, min=64, max=MAX_RESOLUTION, step=8),
        Int("height", 64, min=64, max=MAX_RESOLUTION, step=8),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=8),
        _strength(),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        conditioning: Conditioning,
        width: int,
        height: int,
        x: int,
        y: int,
        strength: float,
    ) -> tuple[Conditioning]:
        area = (height // 8, width // 8, y // 8, x // 8)
        return (set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaPercentage(Node):
    """Limit a conditioning to a rectangle given as fractions of the image's width and height."""

    DISPLAY_NAME = "Conditioning (Set Area with Percentage)"
    CATEGORY = "conditioning"
    INPUTS = (
        Socket("conditioning", CONDITIONING),
        Float("width", 1.0, min=0, max=1.0, step=0.01),
        Float("height", 1.0, min=0, max=1.0, step=0.01),
        Float("x", 0, min=0, max=1.0, step=0.01),
        Float("y", 0, min=0, max=1.0, step=0.01),
        _strength(),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        conditioning: Conditioning,
        width: float,
        height: float,
        x: float,
        y: float,
        strength: float,
    ) -> tuple[Conditioning]:
        area = ("percentage", height, width, y, x)
        return (set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaStrength(Node):
    """Set how strongly a (regional) conditioning weighs against the others where they overlap."""

    CATEGORY = "conditioning"
    INPUTS = (Socket("conditioning", CONDITIONING), _strength())
    OUTPUTS = (Output(CONDITIONING),)

    def run(self, ctx: RunContext, conditioning: Conditioning, strength: float) -> tuple[Conditioning]:
        return (set_values(conditioning, {"strength": strength}),)


class ConditioningSetMask(Node):
    """Limit a conditioning to a mask; "mask bounds" also predicts only on the mask's bounding box."""

    DISPLAY_NAME = "Conditioning (Set Mask)"
    CATEGORY = "conditioning"
    INPUTS = (
        Socket("conditioning", CONDITIONING),
        Socket("mask", MASK),
        _strength(),
        Combo("set_cond_area", choices=("default", "mask bounds")),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        conditioning: Conditioning,
        mask: torch.Tensor,
        strength: float,
        set_cond_area: str,
    ) -> tuple[Conditioning]:
        if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or mask.numel() == 0:
            shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected a MASK [batch, height, width], got {shape}")
        if mask.dim() < 3:
            mask = mask.unsqueeze(0)
        values: CondOptions = {
            "mask": mask,
            "set_area_to_bounds": set_cond_area != "default",
            "mask_strength": strength,
        }
        return (set_values(conditioning, values),)


NODES: tuple[type[Node], ...] = (
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
)
