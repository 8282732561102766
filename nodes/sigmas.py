"""Nodes: SIGMAS (schedulers, split, flip) and SAMPLER objects with options, for custom sampling.

ComfyUI's comfy_extras/nodes_custom_sampler.py and nodes_align_your_steps.py, same ids, inputs
and defaults; the math is in `nodes.sd.sigmas` and the sampler functions in `nodes.sd.samplers`.
"""

from __future__ import annotations

from typing import Any

import torch

from nodegraph.node import Combo, Float, Int, Node, Output, RunContext, Socket
from nodegraph.types import MODEL, SAMPLER, SIGMAS
from nodes.custom_sampling import SamplerChoice
from nodes.sampling import check_model
from nodes.sd import sigmas as sig
from nodes.sd.handles import ModelHandle
from nodes.sd.schedules import SCHEDULER_NAMES, sampler_sigmas

_SCHEDULERS = "sampling/custom_sampling/schedulers"
_SIGMAS = "sampling/custom_sampling/sigmas"
_SAMPLERS = "sampling/custom_sampling/samplers"
SIGMA_MAX, SIGMA_MIN = 14.614642, 0.0291675


def _steps(default: int = 20) -> Int:
    return Int("steps", default, min=1, max=10000)


def _sigma(name: str, default: float) -> Float:
    return Float(name, default, min=0.0, max=5000.0, step=0.01, round=False)


def _option(name: str, default: float, hi: float = 100.0) -> Float:
    return Float(name, default, min=0.0, max=hi, step=0.01, round=False)


def _sigmas_in(sigmas: Any) -> torch.Tensor:
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1:
        raise ValueError("sigmas: expected SIGMAS from a scheduler node")
    return sigmas


class BasicScheduler(Node):
    """The sigmas KSampler would use for this scheduler, steps and denoise."""

    CATEGORY = _SCHEDULERS
    INPUTS = (
        Socket("model", MODEL),
        Combo("scheduler", choices=SCHEDULER_NAMES),
        _steps(),
        Float("denoise", 1.0, min=0.0, max=1.0, step=0.01),
    )
    OUTPUTS = (Output(SIGMAS),)

    def run(
        self, ctx: RunContext, model: ModelHandle, scheduler: str, steps: int, denoise: float
    ) -> tuple[torch.Tensor]:
        check_model(model)
        # denoise < 1: a schedule for int(steps / denoise) steps, its last steps + 1 sigmas
        return (sampler_sigmas(model.sampling.schedule, scheduler, steps, denoise if denoise < 1.0 else 1.0),)


class KarrasScheduler(Node):
    """Karras et al.'s schedule between the given sigma_max and sigma_min, spaced by rho."""

    CATEGORY = _SCHEDULERS
    INPUTS = (_steps(), _sigma("sigma_max", SIGMA_MAX), _sigma("sigma_min", SIGMA_MIN), _option("rho", 7.0))
    OUTPUTS = (Output(SIGMAS),)

    def run(
        self, ctx: RunContext, steps: int, sigma_max: float, sigma_min: float, rho: float
    ) -> tuple[torch.Tensor]:
        return (sig.karras(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler(Node):
    """Sigmas evenly spaced in log between sigma_max and sigma_min."""

    CATEGORY = _SCHEDULERS
    INPUTS = (_steps(), _sigma("sigma_max", SIGMA_MAX), _sigma("sigma_min", SIGMA_MIN))
    OUTPUTS = (Output(SIGMAS),)

    def run(self, ctx: RunContext, steps: int, sigma_max: float, sigma_min: float) -> tuple[torch.Tensor]:
        return (sig.exponential(steps, sigma_min, sigma_max),)


class PolyexponentialScheduler(Node):
    """Sigmas spaced in log along a ramp raised to rho."""

    CATEGORY = _SCHEDULERS
    INPUTS = (_steps(), _sigma("sigma_max", SIGMA_MAX), _sigma("sigma_min", SIGMA_MIN), _option("rho", 1.0))
    OUTPUTS = (Output(SIGMAS),)

    def run(
        self, ctx: RunContext, steps: int, sigma_max: float, sigma_min: float, rho: float
    ) -> tuple[torch.Tensor]:
        return (sig.polyexponential(steps, sigma_min, sigma_max, rho),)


class SDTurboScheduler(Node):
    """SD-Turbo's few-step schedule: table sigmas every 100 timesteps from the top."""

    CATEGORY = _SCHEDULERS
    INPUTS = (
        Socket("model", MODEL),
        Int("steps", 1, min=1, max=10),
        Float("denoise", 1.0, min=0, max=1.0, step=0.01),
    )
    OUTPUTS = (Output(SIGMAS),)

    def run(self, ctx: RunContext, model: ModelHandle, steps: int, denoise: float) -> tuple[torch.Tensor]:
        check_model(model)
        return (sig.sd_turbo(model.sampling.schedule, steps, denoise),)


class AlignYourStepsScheduler(Node):
    """NVIDIA's Align Your Steps noise levels, interpolated to the number of steps."""

    CATEGORY = _SCHEDULERS
    INPUTS = (
        Combo("model_type", choices=tuple(sig.AYS_LEVELS)),
        _steps(10),
        Float("denoise", 1.0, min=0.0, max=1.0, step=0.01),
    )
    OUTPUTS = (Output(SIGMAS),)

    def run(self, ctx: RunContext, model_type: str, steps: int, denoise: float) -> tuple[torch.Tensor]:
        return (sig.align_your_steps(model_type, steps, denoise),)


class SplitSigmas(Node):
    """Split a schedule at a step; the sigma at the split ends the first part and starts the second."""

    CATEGORY = _SIGMAS
    INPUTS = (Socket("sigmas", SIGMAS), Int("step", 0, min=0, max=10000))
    OUTPUTS = (Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas"))

    def run(self, ctx: RunContext, sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return sig.split(_sigmas_in(sigmas), step)


class SplitSigmasDenoise(Node):
    """Split a schedule so that the second part is the last `denoise` fraction of its steps."""

    CATEGORY = _SIGMAS
    INPUTS = (Socket("sigmas", SIGMAS), Float("denoise", 1.0, min=0.0, max=1.0, step=0.01))
    OUTPUTS = (Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas"))

    def run(self, ctx: RunContext, sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
        return sig.split_denoise(_sigmas_in(sigmas), denoise)


class FlipSigmas(Node):
    """Reverse a schedule (for unsampling an image back to noise)."""

    CATEGORY = _SIGMAS
    INPUTS = (Socket("sigmas", SIGMAS),)
    OUTPUTS = (Output(SIGMAS),)

    def run(self, ctx: RunContext, sigmas: torch.Tensor) -> tuple[torch.Tensor]:
        return (sig.flip(_sigmas_in(sigmas)),)


# --------------------------------------------------------------------------------------------
# Sampler objects with options


def _gpu(name: str, noise_device: str) -> str:
    """The `_gpu` twin when noise_device is "gpu" (the same computation on a CPU-only run)."""
    return f"{name}_gpu" if noise_device == "gpu" else name


_NOISE_DEVICE = Combo("noise_device", choices=("gpu", "cpu"))


class SamplerEulerAncestral(Node):
    """Euler ancestral with its eta (fresh noise per step) and s_noise (its scale)."""

    CATEGORY = _SAMPLERS
    INPUTS = (_option("eta", 1.0), _option("s_noise", 1.0))
    OUTPUTS = (Output(SAMPLER),)

    def run(self, ctx: RunContext, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("euler_ancestral", (("eta", eta), ("s_noise", s_noise))),)


class SamplerDPMPP_2S_Ancestral(Node):  # noqa: N801 - ComfyUI's node id
    """DPM++ 2S ancestral with its eta and s_noise."""

    CATEGORY = _SAMPLERS
    INPUTS = (_option("eta", 1.0), _option("s_noise", 1.0))
    OUTPUTS = (Output(SAMPLER),)

    def run(self, ctx: RunContext, eta: float, s_noise: float) -> tuple[SamplerChoice]:
        return (SamplerChoice("dpmpp_2s_ancestral", (("eta", eta), ("s_noise", s_noise))),)


class SamplerLMS(Node):
    """Linear multistep with its order."""

    CATEGORY = _SAMPLERS
    INPUTS = (Int("order", 4, min=1, max=100),)
    OUTPUTS = (Output(SAMPLER),)

    def run(self, ctx: RunContext, order: int) -> tuple[SamplerChoice]:
        return (SamplerChoice("lms", (("order", order),)),)


class SamplerDPMPP_2M_SDE(Node):  # noqa: N801 - ComfyUI's node id
    """DPM++ 2M SDE with its solver (midpoint or heun), eta and s_noise."""

    CATEGORY = _SAMPLERS
    INPUTS = (
        Combo("solver_type", choices=("midpoint", "heun")),
        _option("eta", 1.0),
        _option("s_noise", 1.0),
        _NOISE_DEVICE,
    )
    OUTPUTS = (Output(SAMPLER),)

    def run(
        self, ctx: RunContext, solver_type: str, eta: float, s_noise: float, noise_device: str
    ) -> tuple[SamplerChoice]:
        name = "dpmpp_2m_sde_heun" if solver_type == "heun" else "dpmpp_2m_sde"
        return (SamplerChoice(_gpu(name, noise_device), (("eta", eta), ("s_noise", s_noise))),)


class SamplerDPMPP_3M_SDE(Node):  # noqa: N801 - ComfyUI's node id
    """DPM++ 3M SDE with its eta and s_noise."""

    CATEGORY = _SAMPLERS
    INPUTS = (_option("eta", 1.0), _option("s_noise", 1.0), _NOISE_DEVICE)
    OUTPUTS = (Output(SAMPLER),)

    def run(self, ctx: RunContext, eta: float, s_noise: float, noise_device: str) -> tuple[SamplerChoice]:
        return (SamplerChoice(_gpu("dpmpp_3m_sde", noise_device), (("eta", eta), ("s_noise", s_noise))),)


class SamplerDPMPP_SDE(Node):  # noqa: N801 - ComfyUI's node id
    """DPM++ SDE with its eta, s_noise and r (where the midpoint lies)."""

    CATEGORY = _SAMPLERS
    INPUTS = (_option("eta", 1.0), _option("s_noise", 1.0), _option("r", 0.5), _NOISE_DEVICE)
    OUTPUTS = (Output(SAMPLER),)

    def run(
        self, ctx: RunContext, eta: float, s_noise: float, r: float, noise_device: str
    ) -> tuple[SamplerChoice]:
        options = (("eta", eta), ("s_noise", s_noise), ("r", r))
        return (SamplerChoice(_gpu("dpmpp_sde", noise_device), options),)


NODES: tuple[type[Node], ...] = (
    BasicScheduler,
    KarrasScheduler,
    ExponentialScheduler,
    PolyexponentialScheduler,
    SDTurboScheduler,
    AlignYourStepsScheduler,
    SplitSigmas,
    SplitSigmasDenoise,
    FlipSigmas,
    SamplerEulerAncestral,
    SamplerDPMPP_2S_Ancestral,
    SamplerLMS,
    SamplerDPMPP_2M_SDE,
    SamplerDPMPP_3M_SDE,
    SamplerDPMPP_SDE,
)
