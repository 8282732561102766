"""DPM-Solver fast (fixed orders 3/2/1) and adaptive (PID step size), eta = 0, as ComfyUI runs them.

Restated from comfy/k_diffusion/sampling.py (`DPMSolver`, `PIDStepSizeController`) and
comfy/samplers.py `ksampler` (which integrates from sigma_max down to the last positive sigma).
Both work in t = -ln(sigma) and cache eps per step so a shared evaluation point is computed once.
"""

from __future__ import annotations

import math

import torch

from nodes.sd.samplers.k_diffusion import Callback, Model

EpsCache = dict[str, torch.Tensor]


class _DPMSolver:
    def __init__(self, model: Model, callback: Callback) -> None:
        self.model = model
        self.callback = callback

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def eps(self, cache: EpsCache, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in cache:
            sigma = self.sigma(t) * x.new_ones([x.shape[0]])
            cache[key] = (x - self.model(x, sigma)) / self.sigma(t)
        return cache[key]

    def step_1(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: EpsCache) -> torch.Tensor:
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(
        self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: EpsCache, r1: float = 1 / 2
    ) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        )

    def step_3(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: EpsCache) -> torch.Tensor:
        r1, r2 = 1 / 3, 2 / 3
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - self.sigma(s2) * (r2 * h).expm1() * eps
            - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        )

    def fast(self, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, nfe: int) -> torch.Tensor:
        """dpm_solver_fast: about nfe/3 steps of order 3, ending with lower orders."""
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(float(t_start), float(t_end), m + 1)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            cache: EpsCache = {}
            t, t_next = ts[i], ts[i + 1]
            eps = self.eps(cache, "eps", x, t)
            if self.callback is not None:
                self.callback(i, x - self.sigma(t) * eps, x)
            step = {1: self.step_1, 2: self.step_2, 3: self.step_3}[order]
            x = step(x, t, t_next, cache)
        return x

    def adaptive(self, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        """dpm_solver_adaptive (order 3, rtol 0.05, atol 0.0078, h_init 0.05, I-controller)."""
        atol, rtol = torch.tensor(0.0078), torch.tensor(0.05)
        s, x_prev = t_start, x
        pid = _PIDController(0.05, 0.0, 1.0, 0.0, order=3, accept_safety=0.81)
        steps = 0
        while s < t_end - 1e-5:
            cache: EpsCache = {}
            t = torch.minimum(t_end, s + pid.h)
            eps = self.eps(cache, "eps", x, s)
            denoised = x - self.sigma(s) * eps
            x_low = self.step_2(x, s, t, cache, r1=1 / 3)
            x_high = self.step_3(x, s, t, cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(float(error)):
                x_prev, x, s = x_low, x_high, t
            steps += 1
            if self.callback is not None:
                self.callback(steps - 1, denoised, x)
        return x


class _PIDController:
    """PIDStepSizeController: step-size factor from the last errors, limited by 1 + atan(f - 1)."""

    def __init__(self, h: float, p: float, i: float, d: float, order: float, accept_safety: float) -> None:
        self.h = h
        self.b1, self.b2, self.b3 = (p + i + d) / order, -(p + 2 * d) / order, d / order
        self.accept_safety = accept_safety
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def _range(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t of sigma_max, t of the last positive sigma), as comfy.samplers.ksampler passes them."""
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    return sigmas[0].clone().log().neg(), sigma_min.clone().log().neg()


def sample_dpm_fast(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """dpm_fast: len(sigmas) - 1 model evaluations between sigma_max and the last positive sigma."""
    if len(sigmas) <= 1:
        return x
    t_start, t_end = _range(sigmas)
    return _DPMSolver(model, callback).fast(x, t_start, t_end, len(sigmas) - 1)


def sample_dpm_adaptive(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """dpm_adaptive: as many steps as the error controller wants (the step count is ignored)."""
    if len(sigmas) <= 1:
        return x
    t_start, t_end = _range(sigmas)
    return _DPMSolver(model, callback).adaptive(x, t_start, t_end)
