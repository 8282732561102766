"""Sigma schedules the custom-sampling nodes build from typed values (the SIGMAS socket).

Sources: comfy/k_diffusion/sampling.py `get_sigmas_karras`, `get_sigmas_exponential`,
`get_sigmas_polyexponential`; comfy_extras/nodes_custom_sampler.py (`SDTurboScheduler`,
`SplitSigmas`, `SplitSigmasDenoise`, `FlipSigmas`) and nodes_align_your_steps.py. Every value is
float32 on the CPU, with the same float64 -> float32 casts as ComfyUI.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nodes.sd.schedules import DiscreteSchedule


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """get_sigmas_karras with the node's own sigma_min / sigma_max (not the model's table)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """get_sigmas_exponential: evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """get_sigmas_polyexponential: log sigma along a ramp raised to rho."""
    ramp = torch.linspace(1, 0, n) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero(torch.exp(ramp * (log_max - log_min) + log_min))


def sd_turbo(schedule: DiscreteSchedule, steps: int, denoise: float) -> torch.Tensor:
    """SDTurboScheduler: table sigmas at timesteps 999, 899, ... 99 from 10 − int(10·denoise), then 0."""
    start = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start : start + steps]
    return _append_zero(schedule.sigma(timesteps))


# comfy_extras/nodes_align_your_steps.py NOISE_LEVELS (NVIDIA's published levels)
AYS_LEVELS = {
    "SD1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "SDXL": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "SVD": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}  # fmt: skip


def _loglinear_interp(levels: list[float], num: int) -> list[float]:
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(levels[::-1])
    new_ys = np.interp(np.linspace(0, 1, num), xs, ys)
    return [float(v) for v in np.exp(new_ys)[::-1]]


def align_your_steps(model_type: str, steps: int, denoise: float) -> torch.Tensor:
    """AlignYourStepsScheduler: the 11 levels, log-linearly interpolated to steps + 1, last set to 0."""
    total = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.FloatTensor([])
        total = round(steps * denoise)
    levels = list(AYS_LEVELS[model_type])
    if steps + 1 != len(levels):
        levels = _loglinear_interp(levels, steps + 1)
    levels = levels[-(total + 1) :]
    levels[-1] = 0.0
    return torch.FloatTensor(levels)


def split(sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SplitSigmas: the boundary sigma is in both halves."""
    return sigmas[: step + 1], sigmas[step:]


def split_denoise(sigmas: torch.Tensor, denoise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SplitSigmasDenoise: the last round(steps·denoise) steps are the low half."""
    steps = max(sigmas.shape[-1] - 1, 0)
    total = round(steps * denoise)
    return sigmas[:-total], sigmas[-(total + 1) :]


def flip(sigmas: torch.Tensor) -> torch.Tensor:
    """FlipSigmas: reversed; a leading 0 becomes 0.0001 (unsampling starts above zero)."""
    if len(sigmas) == 0:
        return sigmas
    out = sigmas.flip(0)
    if out[0] == 0:
        out[0] = 0.0001
    return out
