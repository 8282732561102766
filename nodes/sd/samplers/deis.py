"""DEIS (tab mode, order 3), restated from ComfyUI's comfy/k_diffusion/deis.py and `sample_deis`.

The coefficients integrate Lagrange polynomials of the past steps against the VP exponential
integrator's weight, numerically over 10,000 points, after mapping sigma to the VP time t of an
EDM-style schedule (sigma_min 0.002, sigma_max 80), exactly as ComfyUI's copy of diff-solvers does.
"""

from __future__ import annotations

import numpy as np
import torch

from nodes.sd.samplers.k_diffusion import Callback, Model, _notify, _ones


def _edm_to_t(
    sigmas: torch.Tensor, eps_s: float = 1e-3, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """edm2t: (VP times of the sigmas, beta_0, beta_1)."""

    def np_log(v: torch.Tensor) -> torch.Tensor:  # ComfyUI applies numpy's log to float32 tensors here
        return torch.from_numpy(np.asarray(np.log(v.numpy())))

    beta_d = (
        2
        * (np_log(torch.tensor(sigma_min) ** 2 + 1) / eps_s - np_log(torch.tensor(sigma_max) ** 2 + 1))
        / (eps_s - 1)
    )
    beta_min = np_log(torch.tensor(sigma_max) ** 2 + 1) - 0.5 * beta_d
    t = ((beta_min**2 + 2 * beta_d * (sigmas.clone().cpu() ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def _integrand(beta_0: torch.Tensor, beta_1: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """-1/2 d(log alpha)/dtau / sqrt(alpha (1 - alpha)), the derivative by autograd as in ComfyUI."""
    with torch.inference_mode(mode=False), torch.enable_grad():
        taus = taus.clone().requires_grad_(True)
        alpha = torch.exp(-0.5 * taus**2 * (beta_1.clone() - beta_0.clone()) - taus * beta_0.clone())
        alpha.log().sum().backward()
        grad = taus.grad
    assert grad is not None
    return -0.5 * grad / torch.sqrt(alpha.detach() * (1 - alpha.detach()))


def deis_coefficients(sigmas: torch.Tensor, max_order: int = 3, n: int = 10000) -> list[list[torch.Tensor]]:
    """get_deis_coeff_list(deis_mode='tab'): per step, the weights of d_cur, d_{-1}, ..."""
    t_steps, beta_0, beta_1 = _edm_to_t(sigmas)
    coefficients: list[list[torch.Tensor]] = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        taus = torch.linspace(float(t_cur), float(t_next), n)
        dtau = (t_next - t_cur) / n
        prev_t = t_steps[[i - k for k in range(order)]]
        integrand = _integrand(beta_0, beta_1, taus)
        row = []
        for j in range(order):
            poly: torch.Tensor | float = 1
            for k in range(prev_t.shape[0]):
                if k != j:
                    poly = poly * (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
            row.append(torch.sum(integrand * poly) * dtau)
        coefficients.append(row)
    return coefficients


def sample_deis(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_deis (max order 3, tab mode)."""
    s_in = _ones(x)
    coefficients = deis_coefficients(sigmas)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in)
        _notify(callback, i, denoised, x)
        d_cur = (x - denoised) / t_cur
        order = 1 if t_next <= 0 else min(3, i + 1)
        if order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            row = coefficients[i]
            x_next = x + row[0] * d_cur
            for k in range(1, order):
                x_next = x_next + row[k] * history[-k]
        history = (history + [d_cur])[-2:]
        x = x_next
    return x
