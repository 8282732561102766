"""Model patch nodes: FreeU, FreeU_V2, RescaleCFG, PerturbedAttentionGuidance (ComfyUI's ids and inputs).

Each returns the MODEL with one more patch carried as data (`ModelHandle.patches`); the sampler applies
them (`nodes.sd.unet_patches`). Weights and LoRAs are untouched.
"""

from __future__ import annotations

from nodegraph.node import Float, Node, Output, RunContext, Socket
from nodegraph.types import MODEL
from nodes.sd.handles import ModelHandle
from nodes.sd.unet_patches import FreeU as FreeUPatch
from nodes.sd.unet_patches import PerturbedAttention
from nodes.sd.unet_patches import RescaleCFG as RescaleCFGPatch


def _factor(name: str, default: float) -> Float:
    return Float(name, default, min=0.0, max=10.0, step=0.01)


class FreeU(Node):
    """Re-weight the UNet's backbone (b1, b2) and skip features (s1, s2) in its decoder (FreeU)."""

    CATEGORY = "model_patches/unet"
    INPUTS = (
        Socket("model", MODEL),
        _factor("b1", 1.1),
        _factor("b2", 1.2),
        _factor("s1", 0.9),
        _factor("s2", 0.2),
    )
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model: ModelHandle, b1: float, b2: float, s1: float, s2: float
    ) -> tuple[ModelHandle]:
        return (model.with_patch(FreeUPatch(b1, b2, s1, s2, v2=False)),)


class FreeU_V2(Node):  # noqa: N801 - ComfyUI's node id
    """FreeU v2: the backbone factor scaled by each position's normalised mean activation."""

    CATEGORY = "model_patches/unet"
    INPUTS = (
        Socket("model", MODEL),
        _factor("b1", 1.3),
        _factor("b2", 1.4),
        _factor("s1", 0.9),
        _factor("s2", 0.2),
    )
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model: ModelHandle, b1: float, b2: float, s1: float, s2: float
    ) -> tuple[ModelHandle]:
        return (model.with_patch(FreeUPatch(b1, b2, s1, s2, v2=True)),)


class RescaleCFG(Node):
    """Rescale the CFG result's spread to the positive prediction's (less over-saturation at high cfg)."""

    CATEGORY = "advanced/model"
    INPUTS = (Socket("model", MODEL), Float("multiplier", 0.7, min=0.0, max=1.0, step=0.01))
    OUTPUTS = (Output(MODEL),)

    def run(self, ctx: RunContext, model: ModelHandle, multiplier: float) -> tuple[ModelHandle]:
        return (model.with_patch(RescaleCFGPatch(multiplier)),)


class PerturbedAttentionGuidance(Node):
    """Guide away from a pass whose middle-block self-attention is perturbed (PAG), after CFG."""

    CATEGORY = "model_patches/unet"
    INPUTS = (Socket("model", MODEL), Float("scale", 3.0, min=0.0, max=100.0, step=0.01, round=0.01))
    OUTPUTS = (Output(MODEL),)

    def run(self, ctx: RunContext, model: ModelHandle, scale: float) -> tuple[ModelHandle]:
        return (model.with_patch(PerturbedAttention(scale)),)


NODES: tuple[type[Node], ...] = (FreeU, FreeU_V2, RescaleCFG, PerturbedAttentionGuidance)
