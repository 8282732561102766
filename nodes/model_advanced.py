"""Nodes that change how a model is sampled, without touching its weights: ModelSamplingDiscrete."""

from __future__ import annotations

from dataclasses import replace

from nodegraph.node import Boolean, Combo, Node, Output, RunContext, Socket
from nodegraph.types import MODEL
from nodes.sd.handles import ModelHandle
from nodes.sd.model_sampling import PREDICTIONS, ModelSampling


class ModelSamplingDiscrete(Node):
    """Sample the model as eps, v-prediction, LCM or x0, optionally on a zero-terminal-SNR schedule.

    As ComfyUI's node of the same id: the weights and LoRAs are unchanged; the sampler reads the
    parameterisation and the sigma table (LCM: its 50 distilled steps) from the returned MODEL.
    """

    CATEGORY = "advanced/model"
    INPUTS = (
        Socket("model", MODEL),
        Combo("sampling", choices=PREDICTIONS),
        Boolean("zsnr", False),
    )
    OUTPUTS = (Output(MODEL),)

    def run(self, ctx: RunContext, model: ModelHandle, sampling: str, zsnr: bool) -> tuple[ModelHandle]:
        return (replace(model, sampling=ModelSampling(sampling, bool(zsnr))),)


NODES: tuple[type[Node], ...] = (ModelSamplingDiscrete,)
