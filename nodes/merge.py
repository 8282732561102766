"""Nodes: model and CLIP merging (comfy_extras/nodes_model_merging.py), with ComfyUI's ids and inputs.

Each node returns model1 (or clip1) with one more patch in its list (`nodes.sd.merge.MergeRef`):
no weights are copied here; the sampler, the text encoder or CheckpointSave apply the patch on
the shared weights, like a LoRA. The VAE and everything else come from model1.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from nodegraph.node import Float, Node, Output, RunContext, Socket
from nodegraph.types import CLIP, MODEL
from nodes.sd.handles import ClipHandle, ModelHandle
from nodes.sd.merge import MergeRef

CATEGORY = "advanced/model_merging"


def _ratio(name: str) -> Float:
    return Float(name, 1.0, min=0.0, max=1.0, step=0.01)


def _multiplier() -> Float:
    return Float("multiplier", 1.0, min=-10.0, max=10.0, step=0.01)


def _check_models(model1: Any, model2: Any) -> None:
    for label, model in (("model1", model1), ("model2", model2)):
        if not isinstance(model, ModelHandle):
            raise ValueError(f"{label}: expected a MODEL from a checkpoint loader")
    if model1.family != model2.family:
        raise ValueError(
            f"model2: {model2.source} is a {model2.family} model and model1 ({model1.source}) a "
            f"{model1.family} one; only models of one family merge"
        )


def merge_model(node: str, model1: Any, model2: Any, **kw: Any) -> ModelHandle:
    """model1 with a merge patch from model2 (kw: `constant` or `ratios`, see MergeRef)."""
    _check_models(model1, model2)
    ref = MergeRef(model2.unet, tuple(model2.loras), "unet", f"{node}({model2.source})", **kw)
    merged: ModelHandle = replace(model1, loras=model1.loras + (ref,))
    return merged


def merge_clip(node: str, clip1: Any, clip2: Any, strength_patch: float, strength_model: float) -> ClipHandle:
    """clip1 with a merge patch from clip2's text encoder."""
    for label, clip in (("clip1", clip1), ("clip2", clip2)):
        if not isinstance(clip, ClipHandle):
            raise ValueError(f"{label}: expected a CLIP from a checkpoint loader")
    if clip1.family != clip2.family:
        raise ValueError(f"clip2: {clip2.source} is a {clip2.family} text encoder; clip1 is {clip1.family}")
    constant = (strength_patch, strength_model)
    ref = MergeRef(clip2.text_encoder, tuple(clip2.loras), "te", f"{node}({clip2.source})", constant=constant)
    merged: ClipHandle = replace(clip1, loras=clip1.loras + (ref,))
    return merged


class ModelMergeSimple(Node):
    """Blend two models: ratio · model1 + (1 − ratio) · model2 (ratio is model1's share)."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("model1", MODEL), Socket("model2", MODEL), _ratio("ratio"))
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model1: ModelHandle, model2: ModelHandle, ratio: float
    ) -> tuple[ModelHandle]:
        return (merge_model("ModelMergeSimple", model1, model2, constant=(1.0 - ratio, ratio)),)


class ModelMergeBlocks(Node):
    """Blend two models with one ratio (model1's share) for the input, middle and output blocks."""

    CATEGORY = CATEGORY
    INPUTS = (
        Socket("model1", MODEL),
        Socket("model2", MODEL),
        _ratio("input"),
        _ratio("middle"),
        _ratio("out"),
    )
    OUTPUTS = (Output(MODEL),)

    def run(
        self,
        ctx: RunContext,
        model1: ModelHandle,
        model2: ModelHandle,
        input: float,
        middle: float,
        out: float,
    ) -> tuple[ModelHandle]:
        # The declared order (input, middle, out) is the canvas's; keys matching none (time_embed)
        # take the first ratio, as ComfyUI's kwargs order gives them.
        ratios = (("input", input), ("middle", middle), ("out", out))
        return (merge_model("ModelMergeBlocks", model1, model2, ratios=ratios),)


class ModelMergeSubtract(Node):
    """model1 − model2, times multiplier (model1 is scaled too): extracts a fine-tune's difference."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("model1", MODEL), Socket("model2", MODEL), _multiplier())
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model1: ModelHandle, model2: ModelHandle, multiplier: float
    ) -> tuple[ModelHandle]:
        return (merge_model("ModelMergeSubtract", model1, model2, constant=(-multiplier, multiplier)),)


class ModelMergeAdd(Node):
    """model1 + model2: adds a difference made by ModelMergeSubtract."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("model1", MODEL), Socket("model2", MODEL))
    OUTPUTS = (Output(MODEL),)

    def run(self, ctx: RunContext, model1: ModelHandle, model2: ModelHandle) -> tuple[ModelHandle]:
        return (merge_model("ModelMergeAdd", model1, model2, constant=(1.0, 1.0)),)


class CLIPMergeSimple(Node):
    """Blend two text encoders: ratio · clip1 + (1 − ratio) · clip2."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("clip1", CLIP), Socket("clip2", CLIP), _ratio("ratio"))
    OUTPUTS = (Output(CLIP),)

    def run(self, ctx: RunContext, clip1: ClipHandle, clip2: ClipHandle, ratio: float) -> tuple[ClipHandle]:
        return (merge_clip("CLIPMergeSimple", clip1, clip2, 1.0 - ratio, ratio),)


class CLIPMergeSubtract(Node):
    """clip1 − clip2, times multiplier."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("clip1", CLIP), Socket("clip2", CLIP), _multiplier())
    OUTPUTS = (Output(CLIP),)

    def run(
        self, ctx: RunContext, clip1: ClipHandle, clip2: ClipHandle, multiplier: float
    ) -> tuple[ClipHandle]:
        return (merge_clip("CLIPMergeSubtract", clip1, clip2, -multiplier, multiplier),)


class CLIPMergeAdd(Node):
    """clip1 + clip2."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("clip1", CLIP), Socket("clip2", CLIP))
    OUTPUTS = (Output(CLIP),)

    def run(self, ctx: RunContext, clip1: ClipHandle, clip2: ClipHandle) -> tuple[ClipHandle]:
        return (merge_clip("CLIPMergeAdd", clip1, clip2, 1.0, 1.0),)


NODES: tuple[type[Node], ...] = (
    ModelMergeSimple,
    ModelMergeBlocks,
    ModelMergeSubtract,
    ModelMergeAdd,
    CLIPMergeSimple,
    CLIPMergeSubtract,
    CLIPMergeAdd,
)
