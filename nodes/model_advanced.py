"""Nodes that change how a model is sampled, without touching its weights: ModelSamplingDiscrete and
ModelSamplingContinuousEDM (comfy_extras/nodes_model_advanced.py)."""

from __future__ import annotations

from dataclasses import replace

from nodegraph.env import Environment
from nodegraph.node import Boolean, Combo, Float, Node, Output, RunContext, Socket
from nodegraph.types import MODEL
from nodes.sd.handles import ModelHandle
from nodes.sd.model_sampling import PLAYGROUND_2_5, PREDICTIONS, ModelSampling


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
        # the latent format is a patch of its own in ComfyUI: a Playground model keeps its format
        new = ModelSampling(sampling, bool(zsnr), latent_format=model.sampling.latent_format)
        return (replace(model, sampling=new),)


EDM_SAMPLINGS = ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow")
_EDM_REFUSED = {
    "cosmos_rflow": "is the rectified-flow sampling of Cosmos models, a family nodegraph does not run",
}


class ModelSamplingContinuousEDM(Node):
    """Sample the model on a continuous EDM noise schedule between sigma_min and sigma_max.

    As ComfyUI's node: eps and v_prediction with sigma_data 1, edm with sigma_data 0.5;
    edm_playground_v2.5 is edm in Playground v2.5's latent format (per-channel mean and std). The
    UNet is given `0.25·ln σ` as its timestep. The weights and LoRAs are unchanged.
    """

    CATEGORY = "advanced/model"
    INPUTS = (
        Socket("model", MODEL),
        Combo("sampling", choices=EDM_SAMPLINGS),
        Float("sigma_max", 120.0, min=0.0, max=1000.0, step=0.001, round=False),
        Float("sigma_min", 0.002, min=0.0, max=1000.0, step=0.001, round=False),
    )
    OUTPUTS = (Output(MODEL),)

    @classmethod
    def check_inputs(cls, env: Environment, /, *args: object, **constants: object) -> str | None:
        sampling = constants.get("sampling")
        if isinstance(sampling, str) and sampling in _EDM_REFUSED:
            choices = ", ".join(s for s in EDM_SAMPLINGS if s not in _EDM_REFUSED)
            return f"sampling '{sampling}' {_EDM_REFUSED[sampling]}; choose one of {choices}"
        low, high = constants.get("sigma_min"), constants.get("sigma_max")
        if isinstance(low, float) and isinstance(high, float) and not 0 < low < high:
            return f"sigma_min ({low}) must be above 0 and below sigma_max ({high})"
        return None

    def run(
        self, ctx: RunContext, model: ModelHandle, sampling: str, sigma_max: float, sigma_min: float
    ) -> tuple[ModelHandle]:
        if sampling in _EDM_REFUSED:
            raise ValueError(f"ModelSamplingContinuousEDM: sampling '{sampling}' {_EDM_REFUSED[sampling]}")
        fmt = model.sampling.latent_format  # kept unless this sampling brings its own (ComfyUI's patch)
        if sampling == "edm_playground_v2.5":
            sampling, fmt = "edm", PLAYGROUND_2_5
        sigma_data = 0.5 if sampling == "edm" else 1.0
        continuous = ModelSampling(sampling, False, (sigma_min, sigma_max), sigma_data, fmt)
        return (replace(model, sampling=continuous),)


NODES: tuple[type[Node], ...] = (ModelSamplingDiscrete, ModelSamplingContinuousEDM)
