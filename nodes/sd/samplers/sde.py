"""The DPM-Solver++ SDE samplers, driven by a Brownian tree (comfy/k_diffusion/sampling.py).

For an epsilon model the half-log-SNR is lambda = -ln(sigma) and every alpha factor is
sigma * exp(lambda), which is 1 up to rounding; it is computed anyway, as k-diffusion does, so
the float32 results agree bit for bit.
"""

from __future__ import annotations

import torch

from nodes.sd.noise import brownian_noise_sampler
from nodes.sd.samplers.k_diffusion import Callback, Model, _notify, _ones, ancestral_step


def sample_dpmpp_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """sample_dpmpp_sde (KSampler: eta = 1, s_noise = 1, r = 1/2): two model calls per step, noise
    from a Brownian tree."""
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise_sampler(x, sigmas, seed)
    s_in = _ones(x)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        _notify(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = lambda_s_1.neg().exp()
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # 1. step to the midpoint (in lambda), with ancestral noise
        sd, su = ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        x_2 = x_2 + alpha_s_1 * noise(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        # 2. full step using the midpoint prediction
        sd, su = ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def _dpmpp_multistep_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    solver: str,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """sample_dpmpp_2m_sde (solver "midpoint" / "heun") and sample_dpmpp_3m_sde (solver "3m")."""
    if len(sigmas) <= 1:
        return x
    noise = brownian_noise_sampler(x, sigmas, seed)
    s_in = _ones(x)
    denoised_1: torch.Tensor | None = None
    denoised_2: torch.Tensor | None = None
    h: torch.Tensor | None = None
    h_1: torch.Tensor | None = None
    h_2: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        _notify(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            x = _history_correction(x, solver, denoised, denoised_1, denoised_2, h, h_1, h_2, h_eta, alpha_t)
            if eta > 0 and s_noise > 0:
                noise_scale = sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * noise_scale
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _history_correction(
    x: torch.Tensor,
    solver: str,
    denoised: torch.Tensor,
    denoised_1: torch.Tensor | None,
    denoised_2: torch.Tensor | None,
    h: torch.Tensor,
    h_1: torch.Tensor | None,
    h_2: torch.Tensor | None,
    h_eta: torch.Tensor,
    alpha_t: torch.Tensor,
) -> torch.Tensor:
    """The multistep terms that use earlier denoised predictions (none on the first step)."""
    if denoised_1 is None or h_1 is None:
        return x
    if solver == "3m":
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        if h_2 is not None and denoised_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            return x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
        return x + (alpha_t * phi_2) * ((denoised - denoised_1) / (h_1 / h))
    r = h_1 / h
    if solver == "heun":
        return x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - denoised_1)
    return x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - denoised_1)


def sample_dpmpp_2m_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """sample_dpmpp_2m_sde, midpoint solver."""
    return _dpmpp_multistep_sde(model, x, sigmas, seed, callback, "midpoint", eta, s_noise)


def sample_dpmpp_2m_sde_heun(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """sample_dpmpp_2m_sde_heun: the Heun solver variant."""
    return _dpmpp_multistep_sde(model, x, sigmas, seed, callback, "heun", eta, s_noise)


def sample_dpmpp_3m_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """sample_dpmpp_3m_sde: third order from two earlier predictions."""
    return _dpmpp_multistep_sde(model, x, sigmas, seed, callback, "3m", eta, s_noise)
