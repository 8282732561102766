"""Nodes: per-block model merging, ModelMergeSD1 and ModelMergeSDXL
(comfy_extras/nodes_model_merging_model_specific.py), with ComfyUI's ids, inputs and order.

Both are ComfyUI's ModelMergeBlocks with one ratio (model1's share) per original-LDM key prefix of
the UNet: `time_embed.`, `label_emb.`, each input, middle and output block, `out.`. A parameter takes
the ratio of the longest prefix its LDM key starts with, else the first ratio (`time_embed.`, the
first of ComfyUI's kwargs). As every merge node, they add one patch (`nodes.sd.merge.MergeRef`) to
model1's list; no weights are copied. The inputs' names are ComfyUI's key prefixes (with dots), so
they reach `run` through `**ratios`.
"""

from __future__ import annotations

from nodegraph.node import Float, Input, Node, Output, RunContext, Socket
from nodegraph.types import MODEL
from nodes.merge import merge_model
from nodes.sd.handles import ModelHandle

CATEGORY = "advanced/model_merging/model_specific"


def _ratios(prefixes: list[str]) -> tuple[Input, ...]:
    return tuple(Float(p, 1.0, min=0.0, max=1.0, step=0.01) for p in prefixes)


# SD1.x (and SD2.x: the same blocks): the prefixes end with a dot, so input_blocks.1. is not a
# prefix of input_blocks.10.
SD1_PREFIXES = [
    "time_embed.",
    "label_emb.",
    *(f"input_blocks.{i}." for i in range(12)),
    *(f"middle_block.{i}." for i in range(3)),
    *(f"output_blocks.{i}." for i in range(12)),
    "out.",
]
# SDXL: ComfyUI's block prefixes have no trailing dot (nine blocks per side, so none is ambiguous).
SDXL_PREFIXES = [
    "time_embed.",
    "label_emb.",
    *(f"input_blocks.{i}" for i in range(9)),
    *(f"middle_block.{i}" for i in range(3)),
    *(f"output_blocks.{i}" for i in range(9)),
    "out.",
]


def _merge(node: str, model1: ModelHandle, model2: ModelHandle, ratios: dict[str, float]) -> ModelHandle:
    cls = ModelMergeSD1 if node == "ModelMergeSD1" else ModelMergeSDXL
    order = [inp.name for inp in cls.INPUTS if isinstance(inp, Float)]
    missing = [name for name in order if name not in ratios]
    unknown = sorted(set(ratios) - set(order))
    if missing or unknown:
        raise ValueError(f"{node}: ratios missing {missing} or unknown {unknown}")
    pairs = tuple((name, float(ratios[name])) for name in order)
    return merge_model(node, model1, model2, ratios=pairs)


class ModelMergeSD1(Node):
    """Blend two SD1.x models block by block: each ratio is model1's share of that UNet block."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("model1", MODEL), Socket("model2", MODEL), *_ratios(SD1_PREFIXES))
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model1: ModelHandle, model2: ModelHandle, **ratios: float
    ) -> tuple[ModelHandle]:
        return (_merge("ModelMergeSD1", model1, model2, ratios),)


class ModelMergeSDXL(Node):
    """Blend two SDXL models block by block: each ratio is model1's share of that UNet block."""

    CATEGORY = CATEGORY
    INPUTS = (Socket("model1", MODEL), Socket("model2", MODEL), *_ratios(SDXL_PREFIXES))
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model1: ModelHandle, model2: ModelHandle, **ratios: float
    ) -> tuple[ModelHandle]:
        return (_merge("ModelMergeSDXL", model1, model2, ratios),)


NODES: tuple[type[Node], ...] = (ModelMergeSD1, ModelMergeSDXL)
