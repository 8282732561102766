"""Noise schedules: SD1.5's discrete sigma table and the nine ComfyUI schedulers.

Every number here follows ComfyUI (comfy/model_sampling.py `ModelSamplingDiscrete`,
comfy/samplers.py `calculate_sigmas` and the scheduler functions, comfy/k_diffusion/sampling.py
`get_sigmas_*`), including its float64 -> float32 casts, because a schedule that differs in the
last bit moves every step of the sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.stats
import torch

SCHEDULER_NAMES = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)


@dataclass(frozen=True)
class DiscreteSchedule:
    """The 1000 training noise levels of an epsilon-prediction model, as float32 sigmas."""

    sigmas: torch.Tensor  # [1000] float32, ascending
    log_sigmas: torch.Tensor  # [1000] float32
    alphas_cumprod: torch.Tensor  # [1000] float32

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The integer index of the nearest training sigma (in log space): what the UNet is given."""
        dists = sigma.log() - self.log_sigmas.to(sigma.device)[:, None]  # the table follows sigma's device
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a fractional timestep: log-sigma interpolated linearly between table entries."""
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigmas = self.log_sigmas.to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def from_percent(self, percent: float) -> float:
        """The sigma `percent` of the way through sampling, for 0 < percent < 1 (percent_to_sigma)."""
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)))


@lru_cache(maxsize=4)
def sd15_schedule(
    linear_start: float = 0.00085, linear_end: float = 0.012, steps: int = 1000
) -> DiscreteSchedule:
    """SD1.x's "scaled linear" betas, computed in float64 and stored in float32 like ComfyUI."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return DiscreteSchedule(sigmas.float(), sigmas.log().float(), alphas_cumprod.float())


# --------------------------------------------------------------------------------------------
# Schedulers: each returns `steps + 1` float32 sigmas ending in 0 (ddim_uniform and beta may differ)


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def normal(ms: DiscreteSchedule, steps: int, sgm: bool = False) -> torch.Tensor:
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=1e-5):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(t)) for t in timesteps]
    return torch.FloatTensor(sigs + [0.0] if append_zero else sigs)


def sgm_uniform(ms: DiscreteSchedule, steps: int) -> torch.Tensor:
    return normal(ms, steps, sgm=True)


def simple(ms: DiscreteSchedule, steps: int) -> torch.Tensor:
    stride = len(ms.sigmas) / steps
    return torch.FloatTensor([float(ms.sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0])


def ddim_uniform(ms: DiscreteSchedule, steps: int) -> torch.Tensor:
    # ComfyUI's quirk kept on purpose: the table walk from index 1 yields ceil(999/stride) steps.
    sigs: list[float] = []
    x = 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=1e-5):
        steps += 1
    else:
        sigs = [0.0]
    stride = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += stride
    return torch.FloatTensor(sigs[::-1])


def karras(ms: DiscreteSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = float(ms.sigma_min) ** (1 / rho)
    max_inv_rho = float(ms.sigma_max) ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(ms: DiscreteSchedule, steps: int) -> torch.Tensor:
    log_max, log_min = math.log(float(ms.sigma_max)), math.log(float(ms.sigma_min))
    return _append_zero(torch.linspace(log_max, log_min, steps).exp())


def beta(ms: DiscreteSchedule, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    total = len(ms.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta_) * total)
    sigs: list[float] = []
    last_t = -1.0
    for t in ts:
        if t != last_t:  # consecutive duplicates collapse, so beta may give fewer steps
            sigs.append(float(ms.sigmas[int(t)]))
        last_t = t
    return torch.FloatTensor(sigs + [0.0])


def linear_quadratic(ms: DiscreteSchedule, steps: int, threshold: float = 0.025) -> torch.Tensor:
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold * steps
        quadratic_steps = steps - linear_steps
        quad_coef = step_diff / (linear_steps * quadratic_steps**2)
        lin_coef = threshold / linear_steps - 2 * step_diff / (quadratic_steps**2)
        const = quad_coef * (linear_steps**2)
        quadratic = [quad_coef * (i**2) + lin_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * ms.sigma_max


def kl_optimal(ms: DiscreteSchedule, steps: int) -> torch.Tensor:
    # ComfyUI divides by steps - 1 and so gives NaN for one step; one step here starts at sigma_max
    idx = torch.arange(steps, dtype=torch.float).div_(max(steps - 1, 1))
    sigmas = idx.new_zeros(steps + 1)
    lo, hi = math.atan(float(ms.sigma_min)), math.atan(float(ms.sigma_max))
    sigmas[:-1] = (idx * lo + (1 - idx) * hi).tan_()
    return sigmas


SCHEDULERS: dict[str, Callable[[DiscreteSchedule, int], torch.Tensor]] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}


def calculate_sigmas(ms: DiscreteSchedule, scheduler: str, steps: int) -> torch.Tensor:
    """The sigmas of one named scheduler for `steps` steps (float32, CPU)."""
    try:
        fn = SCHEDULERS[scheduler]
    except KeyError:
        raise ValueError(
            f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULER_NAMES)}"
        ) from None
    return fn(ms, steps).float()


def sampler_sigmas(
    ms: DiscreteSchedule, scheduler: str, steps: int, denoise: float = 1.0, discard_penultimate: bool = False
) -> torch.Tensor:
    """The sigmas KSampler uses: ComfyUI's `KSampler.set_steps` and `calculate_sigmas`.

    1. Some samplers (dpm_2, uni_pc) want a schedule for one more step without its penultimate sigma.
    2. denoise < 1 computes a schedule for int(steps / denoise) steps and keeps its last steps + 1.
    """

    def schedule(n: int) -> torch.Tensor:
        if discard_penultimate:
            sigmas = calculate_sigmas(ms, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return calculate_sigmas(ms, scheduler, n)

    if denoise > 0.9999:
        return schedule(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return schedule(int(steps / denoise))[-(steps + 1) :]


def split_sigmas(
    sigmas: torch.Tensor, start_step: int | None, last_step: int | None, force_full_denoise: bool
) -> torch.Tensor | None:
    """KSamplerAdvanced's window on a schedule; None when nothing is left to sample."""
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas
