"""res_multistep and gradient_estimation samplers, each with its CFG++ form
(comfy/k_diffusion/sampling.py `res_multistep`, `sample_gradient_estimation`).
"""

from __future__ import annotations

import torch

from nodes.sd.noise import default_noise_sampler
from nodes.sd.samplers.cfg_pp import _uncond
from nodes.sd.samplers.k_diffusion import Callback, Model, _notify, _ones, ancestral_step, to_d


def _phi1(t: torch.Tensor) -> torch.Tensor:
    return torch.expm1(t) / t


def _phi2(t: torch.Tensor) -> torch.Tensor:
    return (_phi1(t) - 1.0) / t


def _res_multistep(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    eta: float,
    cfg_pp: bool,
) -> torch.Tensor:
    """Second-order multistep exponential integrator (arXiv 2308.02157), optionally ancestral."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    old_sigma_down: torch.Tensor | None = None
    old_denoised: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond = _uncond(model) if cfg_pp else denoised
        if eta:
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        else:
            sigma_down, sigma_up = sigmas[i + 1], 0.0  # type: ignore[assignment]
        _notify(callback, i, denoised, x)
        if sigma_down == 0 or old_denoised is None or old_sigma_down is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = sigmas[i].log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), sigmas[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = _phi1(-h), _phi2(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = h.neg().exp() * x + h * (b1 * uncond + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
        old_denoised = uncond
        old_sigma_down = sigma_down
    return x


def sample_res_multistep(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """res_multistep (deterministic)."""
    return _res_multistep(model, x, sigmas, seed, callback, eta=0.0, cfg_pp=False)


def sample_res_multistep_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """res_multistep_cfg_pp."""
    return _res_multistep(model, x, sigmas, seed, callback, eta=0.0, cfg_pp=True)


def sample_res_multistep_ancestral(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """res_multistep_ancestral (eta = 1)."""
    return _res_multistep(model, x, sigmas, seed, callback, eta=1.0, cfg_pp=False)


def sample_res_multistep_ancestral_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """res_multistep_ancestral_cfg_pp (eta = 1)."""
    return _res_multistep(model, x, sigmas, seed, callback, eta=1.0, cfg_pp=True)


def _gradient_estimation(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback, cfg_pp: bool, gamma: float = 2.0
) -> torch.Tensor:
    """Euler plus a correction from the change of the derivative (openreview o2ND9v0CeK)."""
    s_in = _ones(x)
    old_d: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], _uncond(model) if cfg_pp else denoised)
        _notify(callback, i, denoised, x)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1 and old_d is not None:
                x = x + (gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def sample_gradient_estimation(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """gradient_estimation (gamma = 2)."""
    return _gradient_estimation(model, x, sigmas, callback, cfg_pp=False)


def sample_gradient_estimation_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """gradient_estimation_cfg_pp."""
    return _gradient_estimation(model, x, sigmas, callback, cfg_pp=True)
