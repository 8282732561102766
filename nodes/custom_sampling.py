"""Nodes: custom sampling, ComfyUI's sampler built from pieces (comfy_extras/nodes_custom_sampler.py).

SamplerCustom and SamplerCustomAdvanced take a NOISE (RandomNoise / DisableNoise), a GUIDER
(CFGGuider, BasicGuider, DualCFGGuider), a SAMPLER (KSamplerSelect or a sampler node with its
options) and SIGMAS (the scheduler nodes in `nodes.sigmas`). The math is KSampler's
(`nodes.sd.ksampler.run_guided`), so SamplerCustom + KSamplerSelect + BasicScheduler is KSampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from nodegraph.node import MAX_SEED, Boolean, Combo, Float, Int, Node, Output, RunContext, Socket
from nodegraph.types import CONDITIONING, GUIDER, LATENT, MODEL, NOISE, SAMPLER, SIGMAS
from nodes.sampling import check_latent, check_model, progress
from nodes.sd import unet_patches
from nodes.sd.control import has_control_lora
from nodes.sd.device import place, placement
from nodes.sd.guidance import ConditioningError
from nodes.sd.guiders import BasicGuide, CFGGuide, DualCFGGuide, Guide
from nodes.sd.handles import ModelHandle
from nodes.sd.hypernetwork import hypernetworks_applied
from nodes.sd.ksampler import latent_format, run_guided
from nodes.sd.noise import prepare_noise
from nodes.sd.patcher import patched
from nodes.sd.samplers import SAMPLER_NAMES, SAMPLERS
from nodes.sd.samplers.k_diffusion import Sampler
from nodes.sd.values import Conditioning, Latent

# --------------------------------------------------------------------------------------------
# Values on the NOISE, GUIDER and SAMPLER sockets


@dataclass(frozen=True)
class NoiseSource:
    """NOISE: Noise_RandomNoise(seed), or Noise_EmptyNoise (zeros, seed 0) when `seed` is None."""

    seed: int | None

    @property
    def sampler_seed(self) -> int:
        """The seed the sampler's own (ancestral, SDE) noise uses: Noise_EmptyNoise's is 0."""
        return 0 if self.seed is None else self.seed

    def generate(self, latent: Latent) -> torch.Tensor:
        samples: torch.Tensor = latent["samples"]
        if self.seed is None:
            return torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout)
        return prepare_noise(samples, self.seed, latent.get("batch_index"))


@dataclass(frozen=True)
class GuiderValue:
    """GUIDER: the model to sample with and how its predictions are guided."""

    model: ModelHandle
    guide: Guide


@dataclass(frozen=True)
class SamplerChoice:
    """SAMPLER: a sampler name and the options its node set (KSamplerSelect sets none)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def function(self) -> Sampler:
        fn = SAMPLERS[self.name]
        return partial(fn, **dict(self.options)) if self.options else fn


def _check_sigmas(sigmas: Any) -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1:
        raise ValueError(
            "sigmas: expected SIGMAS from a scheduler node (BasicScheduler, KarrasScheduler, ...)"
        )
    return sigmas.float()


def sample_custom(
    ctx: RunContext,
    guider: GuiderValue,
    noise: NoiseSource,
    sampler: SamplerChoice,
    sigmas: torch.Tensor,
    latent: Latent,
    seed: int,
) -> tuple[Latent, Latent]:
    """CFGGuider.sample: (output, denoised_output) LATENTs; denoised is the last step's x0.

    `seed` seeds the sampler's own noise (ancestral and SDE samplers)."""
    model = guider.model
    check_model(model)
    check_latent(latent)
    sigmas = _check_sigmas(sigmas)
    if sampler.name not in SAMPLERS:
        raise ValueError(f"sampler: unknown sampler {sampler.name!r}")
    last: list[torch.Tensor] = []
    report = progress(ctx, model)

    def on_step(i: int, total: int, x0: torch.Tensor) -> None:
        last[:] = [x0]
        report(i, total, x0)

    where = placement(ctx.env)
    place(model.unet, where.device, where.unet)
    try:
        with (
            patched(model.unet, model.loras, target="unet", exact=has_control_lora(guider.guide)) as unet,
            hypernetworks_applied(unet, model.hypernetworks),
            unet_patches.applied(unet, model.patches),
            torch.inference_mode(),
        ):
            device = next(unet.parameters()).device
            samples = run_guided(
                unet,
                guider.guide,
                latent,
                noise.generate(latent),
                sigmas,
                sampler.name,
                sampler.function(),
                seed,
                on_step,
                device,
                model.sampling,
            )
    except ConditioningError as exc:
        raise ValueError(str(exc)) from exc
    out = latent.copy()
    out["samples"] = samples
    denoised = out
    if last:
        denoised = latent.copy()
        fmt = latent_format(model.unet, model.sampling)
        denoised["samples"] = fmt.process_out(last[0].to(torch.float32).cpu())
    return out, denoised


_LATENT_OUTPUTS = (Output(LATENT, "output"), Output(LATENT, "denoised_output"))


class SamplerCustom(Node):
    """Sample with a chosen sampler and sigma schedule: KSampler's computation with explicit pieces."""

    CATEGORY = "sampling/custom_sampling"
    INPUTS = (
        Socket("model", MODEL),
        Boolean("add_noise", True),
        Int("noise_seed", 0, min=0, max=MAX_SEED, control_after_generate=True),
        Float("cfg", 8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        Socket("positive", CONDITIONING),
        Socket("negative", CONDITIONING),
        Socket("sampler", SAMPLER),
        Socket("sigmas", SIGMAS),
        Socket("latent_image", LATENT),
    )
    OUTPUTS = _LATENT_OUTPUTS

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        add_noise: bool,
        noise_seed: int,
        cfg: float,
        positive: Conditioning,
        negative: Conditioning,
        sampler: SamplerChoice,
        sigmas: torch.Tensor,
        latent_image: Latent,
    ) -> tuple[Latent, Latent]:
        noise = NoiseSource(noise_seed if add_noise else None)
        guider = GuiderValue(model, CFGGuide(positive, negative, cfg))
        # noise_seed also seeds the sampler's own noise, even without initial noise (as ComfyUI)
        return sample_custom(ctx, guider, noise, sampler, sigmas, latent_image, noise_seed)


class SamplerCustomAdvanced(Node):
    """Sample with a noise source, a guider, a sampler and sigmas, each from its own node."""

    CATEGORY = "sampling/custom_sampling"
    INPUTS = (
        Socket("noise", NOISE),
        Socket("guider", GUIDER),
        Socket("sampler", SAMPLER),
        Socket("sigmas", SIGMAS),
        Socket("latent_image", LATENT),
    )
    OUTPUTS = _LATENT_OUTPUTS

    def run(
        self,
        ctx: RunContext,
        noise: NoiseSource,
        guider: GuiderValue,
        sampler: SamplerChoice,
        sigmas: torch.Tensor,
        latent_image: Latent,
    ) -> tuple[Latent, Latent]:
        return sample_custom(ctx, guider, noise, sampler, sigmas, latent_image, noise.sampler_seed)


class RandomNoise(Node):
    """Noise from a seed, drawn as KSampler draws it."""

    CATEGORY = "sampling/custom_sampling/noise"
    INPUTS = (Int("noise_seed", 0, min=0, max=MAX_SEED, control_after_generate=True),)
    OUTPUTS = (Output(NOISE),)

    def run(self, ctx: RunContext, noise_seed: int) -> tuple[NoiseSource]:
        return (NoiseSource(noise_seed),)


class DisableNoise(Node):
    """No noise: sample the latent as it is (for a second stage or unsampling)."""

    CATEGORY = "sampling/custom_sampling/noise"
    OUTPUTS = (Output(NOISE),)

    def run(self, ctx: RunContext) -> tuple[NoiseSource]:
        return (NoiseSource(None),)


class CFGGuider(Node):
    """Guide with a positive and a negative prompt and one cfg scale (KSampler's guidance)."""

    DISPLAY_NAME = "CFG Guider"
    CATEGORY = "sampling/custom_sampling/guiders"
    INPUTS = (
        Socket("model", MODEL),
        Socket("positive", CONDITIONING),
        Socket("negative", CONDITIONING),
        Float("cfg", 8.0, min=0.0, max=100.0, step=0.1, round=0.01),
    )
    OUTPUTS = (Output(GUIDER),)

    def run(
        self, ctx: RunContext, model: ModelHandle, positive: Conditioning, negative: Conditioning, cfg: float
    ) -> tuple[GuiderValue]:
        return (GuiderValue(model, CFGGuide(positive, negative, cfg)),)


class BasicGuider(Node):
    """Guide with one conditioning and no negative (cfg 1), for distilled models."""

    DISPLAY_NAME = "Basic Guider"
    CATEGORY = "sampling/custom_sampling/guiders"
    INPUTS = (Socket("model", MODEL), Socket("conditioning", CONDITIONING))
    OUTPUTS = (Output(GUIDER),)

    def run(self, ctx: RunContext, model: ModelHandle, conditioning: Conditioning) -> tuple[GuiderValue]:
        return (GuiderValue(model, BasicGuide(conditioning)),)


class DualCFGGuider(Node):
    """Guide with two prompts and a negative: cfg_conds between the prompts, cfg_cond2_negative
    between the second prompt and the negative."""

    DISPLAY_NAME = "Dual CFG Guider"
    CATEGORY = "sampling/custom_sampling/guiders"
    INPUTS = (
        Socket("model", MODEL),
        Socket("cond1", CONDITIONING),
        Socket("cond2", CONDITIONING),
        Socket("negative", CONDITIONING),
        Float("cfg_conds", 8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        Float("cfg_cond2_negative", 8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        Combo("style", choices=("regular", "nested")),
    )
    OUTPUTS = (Output(GUIDER),)

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        cond1: Conditioning,
        cond2: Conditioning,
        negative: Conditioning,
        cfg_conds: float,
        cfg_cond2_negative: float,
        style: str,
    ) -> tuple[GuiderValue]:
        guide = DualCFGGuide(cond1, cond2, negative, cfg_conds, cfg_cond2_negative, style == "nested")
        return (GuiderValue(model, guide),)


class KSamplerSelect(Node):
    """Pick a sampler by name, with KSampler's default options."""

    CATEGORY = "sampling/custom_sampling/samplers"
    INPUTS = (Combo("sampler_name", choices=SAMPLER_NAMES),)
    OUTPUTS = (Output(SAMPLER),)

    def run(self, ctx: RunContext, sampler_name: str) -> tuple[SamplerChoice]:
        return (SamplerChoice(sampler_name),)


NODES: tuple[type[Node], ...] = (
    SamplerCustom,
    SamplerCustomAdvanced,
    RandomNoise,
    DisableNoise,
    CFGGuider,
    BasicGuider,
    DualCFGGuider,
    KSamplerSelect,
)
