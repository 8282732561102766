"""Guidance patch nodes: SelfAttentionGuidance (comfy_extras/nodes_sag.py), DifferentialDiffusion
(nodes_differential_diffusion.py), PerpNeg and PerpNegGuider (nodes_perpneg.py), with ComfyUI's
ids, inputs and numbers.

SelfAttentionGuidance, DifferentialDiffusion and PerpNeg return the MODEL with one more patch carried
as data (`nodes.sd.unet_patches`), applied by the sampler (`nodes.sd.cfg_patches`, the inpainting
mask in `nodes.sd.ksampler`); PerpNegGuider is a GUIDER (`nodes.sd.guiders.PerpNegGuide`).
"""

from __future__ import annotations

from nodegraph.node import Float, Node, Output, RunContext, Socket
from nodegraph.types import CONDITIONING, GUIDER, MODEL
from nodes.custom_sampling import GuiderValue
from nodes.sampling import check_model
from nodes.sd.guiders import PerpNegGuide
from nodes.sd.handles import ModelHandle
from nodes.sd.unet_patches import DifferentialDiffusion as DifferentialPatch
from nodes.sd.unet_patches import PerpNeg as PerpNegPatch
from nodes.sd.unet_patches import SelfAttention
from nodes.sd.values import Conditioning


def _model(node: str, model: ModelHandle) -> ModelHandle:
    try:
        check_model(model)
    except ValueError as exc:
        raise ValueError(f"{node}: {exc}") from exc
    return model


def _conditioning(node: str, name: str, value: Conditioning) -> Conditioning:
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{node}: input {name} needs a CONDITIONING (e.g. CLIPTextEncode of an empty prompt)"
        )
    return value


class SelfAttentionGuidance(Node):
    """Guide away from a prediction blurred where the middle block's self-attention looks (SAG)."""

    DISPLAY_NAME = "Self-Attention Guidance"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True
    INPUTS = (
        Socket("model", MODEL),
        Float("scale", 0.5, min=-2.0, max=5.0, step=0.01),
        Float("blur_sigma", 2.0, min=0.0, max=10.0, step=0.1),
    )
    OUTPUTS = (Output(MODEL),)

    def run(self, ctx: RunContext, model: ModelHandle, scale: float, blur_sigma: float) -> tuple[ModelHandle]:
        return (_model("SelfAttentionGuidance", model).with_patch(SelfAttention(scale, blur_sigma)),)


class DifferentialDiffusion(Node):
    """Inpaint with a soft mask as a per-step strength map: each pixel starts when the run reaches it."""

    DISPLAY_NAME = "Differential Diffusion"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True
    INPUTS = (Socket("model", MODEL), Float("strength", 1.0, min=0.0, max=1.0, step=0.01, optional=True))
    OUTPUTS = (Output(MODEL),)

    def run(self, ctx: RunContext, model: ModelHandle, strength: float = 1.0) -> tuple[ModelHandle]:
        return (_model("DifferentialDiffusion", model).with_patch(DifferentialPatch(strength)),)


class PerpNeg(Node):
    """Replace the CFG mix by Perp-Neg's, the empty prompt as reference (superseded by PerpNegGuider)."""

    DISPLAY_NAME = "Perp-Neg (DEPRECATED by PerpNegGuider)"
    CATEGORY = "_for_testing"
    EXPERIMENTAL = True
    DEPRECATED = True
    INPUTS = (
        Socket("model", MODEL),
        Socket("empty_conditioning", CONDITIONING),
        Float("neg_scale", 1.0, min=0.0, max=100.0, step=0.01),
    )
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model: ModelHandle, empty_conditioning: Conditioning, neg_scale: float
    ) -> tuple[ModelHandle]:
        empty = _conditioning("PerpNeg", "empty_conditioning", empty_conditioning)
        return (_model("PerpNeg", model).with_patch(PerpNegPatch(empty, neg_scale)),)


class PerpNegGuider(Node):
    """Guide with a negative prompt that only pushes perpendicular to the positive one (Perp-Neg)."""

    CATEGORY = "_for_testing"
    EXPERIMENTAL = True
    INPUTS = (
        Socket("model", MODEL),
        Socket("positive", CONDITIONING),
        Socket("negative", CONDITIONING),
        Socket("empty_conditioning", CONDITIONING),
        Float("cfg", 8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        Float("neg_scale", 1.0, min=0.0, max=100.0, step=0.01),
    )
    OUTPUTS = (Output(GUIDER),)

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        positive: Conditioning,
        negative: Conditioning,
        empty_conditioning: Conditioning,
        cfg: float,
        neg_scale: float,
    ) -> tuple[GuiderValue]:
        _model("PerpNegGuider", model)
        empty = _conditioning("PerpNegGuider", "empty_conditioning", empty_conditioning)
        return (GuiderValue(model, PerpNegGuide(positive, negative, empty, cfg, neg_scale)),)


NODES: tuple[type[Node], ...] = (SelfAttentionGuidance, DifferentialDiffusion, PerpNeg, PerpNegGuider)
