"""ER-SDE-Solver-3, SEEDS-2 and SEEDS-3 (comfy/k_diffusion/sampling.py `sample_er_sde`, `sample_seeds_*`).

Both add fresh Gaussian noise from the seeded step generator. For an epsilon model the half
log-SNR is -ln(sigma) and the alpha factors are 1 up to rounding; they are computed as ComfyUI does.
"""

from __future__ import annotations

import torch

from nodes.sd.noise import default_noise_sampler
from nodes.sd.samplers.k_diffusion import Callback, Model, _notify, _ones


def _er_noise_scaler(x: torch.Tensor) -> torch.Tensor:
    return x * ((x**0.3).exp() + 10.0)


def sample_er_sde(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """er_sde: up to third order from earlier predictions, integrals over 200 points (arXiv 2309.06169)."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    points = torch.arange(0, 200.0, dtype=torch.float32, device=x.device)
    er_lambdas = sigmas.log().neg().neg().exp()  # sigma_t / alpha_t
    old_denoised: torch.Tensor | None = None
    old_denoised_d: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        _notify(callback, i, denoised, x)
        stage = min(3, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = _er_noise_scaler(lam_t) / _er_noise_scaler(lam_s)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2 and old_denoised is not None:
                dt = lam_t - lam_s
                step = -dt / 200.0
                positions = lam_t + points * step
                scaled = _er_noise_scaler(positions)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * _er_noise_scaler(lam_t)) * denoised_d
                if stage >= 3 and old_denoised_d is not None:
                    s_u = torch.sum((positions - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * _er_noise_scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            scale = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * 1.0 * scale
        old_denoised = denoised
    return x


def sample_seeds_2(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """seeds_2 (eta = 1, r = 1/2, phi_1 solver): two model calls per step with split noise."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    r, eta = 0.5, 1.0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        _notify(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = lambda_s_1.neg().exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # 1. to the intermediate point, with its share of the noise
        x_2 = (
            sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * torch.expm1(-r * h_eta) * denoised
        )
        sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s_1)
        x_2 = x_2 + sde_noise * sigma_s_1 * 1.0
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        # 2. the full step, carrying the first noise forward and adding the second half's
        denoised_d = torch.lerp(denoised, denoised_2, fac)
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * torch.expm1(-h_eta) * denoised_d
        segment = (r - 1) * h * eta
        sde_noise = sde_noise * segment.exp()
        sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s_1, sigmas[i + 1])
        x = x + sde_noise * sigmas[i + 1] * 1.0
    return x


def _phi_2(h: torch.Tensor) -> torch.Tensor:
    """h * phi_2(h) of exponential integrators."""
    return (torch.expm1(h) - h) / h


def sample_seeds_3(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """seeds_3 (eta = 1, r = 1/3, 2/3): three model calls per step with split noise."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    r_1, r_2, eta = 1.0 / 3, 2.0 / 3, 1.0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        _notify(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1, lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_1), torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = lambda_s_1.neg().exp(), lambda_s_2.neg().exp()
        alpha_s_1, alpha_s_2 = sigma_s_1 * lambda_s_1.exp(), sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # 1. to the first third
        x_2 = (
            sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x
            - alpha_s_1 * torch.expm1(-r_1 * h_eta) * denoised
        )
        sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s_1)
        x_2 = x_2 + sde_noise * sigma_s_1 * 1.0
        denoised_2 = model(x_2, sigma_s_1 * s_in)
        # 2. to the second third, second order from the first two predictions
        a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        a3_1 = torch.expm1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (
            a3_1 * denoised + a3_2 * denoised_2
        )
        segment = (r_1 - r_2) * h * eta
        sde_noise = sde_noise * segment.exp()
        sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s_1, sigma_s_2)
        x_3 = x_3 + sde_noise * sigma_s_2 * 1.0
        denoised_3 = model(x_3, sigma_s_2 * s_in)
        # 3. the full step
        b3 = _phi_2(-h_eta) / r_2
        b1 = torch.expm1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        segment = (r_2 - 1) * h * eta
        sde_noise = sde_noise * segment.exp()
        sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s_2, sigmas[i + 1])
        x = x + sde_noise * sigmas[i + 1] * 1.0
    return x
