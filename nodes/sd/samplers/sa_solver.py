"""SA-Solver (stochastic Adams predictor-corrector, arXiv 2309.05019), restated from ComfyUI's
comfy/k_diffusion/sa_solver.py and `sample_sa_solver` (predictor order 3, corrector order 4,
noise only while 0.2 <= percent <= 0.8 of the schedule, eta 1). `sa_solver_pece` re-evaluates the
model on the corrected state.

The noise window is read from the sampled model's own table, as ComfyUI reads it from the model's
`model_sampling` (`percent_to_sigma(0.2)` .. `(0.8)`): a zero-terminal-SNR, LCM or continuous EDM model
gets its own window, not SD1.5's.
"""

from __future__ import annotations

import math

import torch

from nodes.sd.cond_entries import percent_to_sigma
from nodes.sd.noise import default_noise_sampler
from nodes.sd.samplers.k_diffusion import Callback, Model, _notify, _ones
from nodes.sd.schedules import DiscreteSchedule, sd15_schedule


def _exponential_coeffs(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    """(1 + tau^2) ∫_s^t exp((1 + tau^2) x) x^p dx for p < order, with exp((1 + tau^2) t) factored out."""
    tau_mul = 1 + tau**2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    product_terms = t**p - s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    coeff = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        coeff = coeff - (depth * math.log(tau_mul))
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (coeff.exp() * signs).tril() @ product_terms


def _b_coeffs(
    sigma_next: torch.Tensor,
    lambdas: torch.Tensor,
    lambda_s: torch.Tensor,
    lambda_t: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """compute_stochastic_adams_b_coeffs: Lagrange-basis integrals from a Vandermonde solve."""
    n = lambdas.shape[0]
    integrals: torch.Tensor = torch.linalg.solve(
        torch.vander(lambdas, n, increasing=True).T, _exponential_coeffs(lambda_s, lambda_t, n, tau)
    )
    return sigma_next * lambda_t.exp() * integrals


def model_schedule(model: Model) -> DiscreteSchedule:
    """The sigma table of the model being sampled (the denoiser's `schedule`, ComfyUI's
    `model_sampling`); SD1.5's for a bare function, which carries none."""
    schedule = getattr(model, "schedule", None)
    return schedule if isinstance(schedule, DiscreteSchedule) else sd15_schedule()


def _sa_solver(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback, pece: bool
) -> torch.Tensor:
    if len(sigmas) <= 1:
        return x
    noise_sampler = default_noise_sampler(x, seed)
    s_in = _ones(x)
    lambdas = sigmas.log().neg()
    schedule = model_schedule(model)
    start, end = percent_to_sigma(schedule, 0.2), percent_to_sigma(schedule, 0.8)

    def tau_func(sigma: torch.Tensor) -> float:
        return 1.0 if start >= sigma.item() >= end else 0.0

    predictor_order, corrector_order = 3, 4
    x_pred = x
    h: torch.Tensor | float = 0.0
    tau_t, noise = 0.0, torch.zeros(())
    preds: list[torch.Tensor] = []
    to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in)
        _notify(callback, i, denoised, x_pred)
        preds = (preds + [denoised])[-4:]
        p_order = min(predictor_order, len(preds))
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not pece) else min(corrector_order, len(preds))
        if to_end:  # lower orders near the end, for stability
            p_order = min(p_order, len(sigmas) - 2 - i)
            c_order = min(c_order, len(sigmas) - 1 - i)
        if c_order == 0:
            x = x_pred
        else:
            b = _b_coeffs(sigmas[i], lambdas[i - c_order + 1 : i + 1], lambdas[i - 1], lambdas[i], tau_t)
            corr = torch.tensordot(torch.stack(preds[-c_order:], dim=1), b, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * torch.exp(-(tau_t**2) * torch.as_tensor(h)) * x + corr
            if tau_t > 0:
                x = x + noise
            if pece:
                denoised = model(x, sigmas[i] * s_in)
                preds[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            b = _b_coeffs(sigmas[i + 1], lambdas[i - p_order + 1 : i + 1], lambdas[i], lambdas[i + 1], tau_t)
            pred = torch.tensordot(torch.stack(preds[-p_order:], dim=1), b, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred
            if tau_t > 0:
                fresh = noise_sampler(sigmas[i], sigmas[i + 1])
                noise = fresh * sigmas[i + 1] * (-2 * tau_t**2 * h).expm1().neg().sqrt() * 1.0
                x_pred = x_pred + noise
    return x_pred


def sample_sa_solver(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sa_solver: predict-evaluate-correct."""
    return _sa_solver(model, x, sigmas, seed, callback, pece=False)


def sample_sa_solver_pece(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sa_solver_pece: predict-evaluate-correct-evaluate."""
    return _sa_solver(model, x, sigmas, seed, callback, pece=True)
