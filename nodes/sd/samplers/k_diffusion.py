"""The k-diffusion samplers ComfyUI offers, restated from comfy/k_diffusion/sampling.py.

Each sampler is `fn(model, x, sigmas, seed, callback) -> x`: `model(x, sigma_batch)` returns the
guided denoised prediction (x0) and `callback(i, denoised, x)` is called once per step. The
arithmetic (which tensors are 0-d, the order of operations) mirrors k-diffusion's so that the
same inputs give the same float32 bits; the comments name the original function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy import integrate

from nodes.sd.noise import default_noise_sampler

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None
Sampler = Callable[[Model, torch.Tensor, torch.Tensor, "int | None", Callback], torch.Tensor]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


def ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): where to step deterministically and how much fresh noise to add."""
    if not eta:
        return sigma_to, sigma_to * 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _notify(callback: Callback, i: int, denoised: torch.Tensor, x: torch.Tensor) -> None:
    if callback is not None:
        callback(i, denoised, x)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones([x.shape[0]])


def sample_euler(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_euler (s_churn = 0). ComfyUI's "ddim" is this same function."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        _notify(callback, i, denoised, x)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_euler_ancestral(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """sample_euler_ancestral (KSampler: eta = 1, s_noise = 1; SamplerEulerAncestral sets them)."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _notify(callback, i, denoised, x)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_heun(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_heun: a second model call at sigma_{i+1} except on the last step."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        _notify(callback, i, denoised, x)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


def sample_heunpp2(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_heunpp2: Heun++ with up to three model calls per step."""
    s_in = _ones(x)
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        _notify(callback, i, denoised, x)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
        if sigmas[i + 2] == s_end:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def sample_dpm_2(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_dpm_2: a midpoint (in log sigma) evaluation per step."""
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        _notify(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def sample_dpm_2_ancestral(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_dpm_2_ancestral (eta = 1)."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        _notify(callback, i, denoised, x)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
    return x


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """∫ over [t_i, t_{i+1}] of the j-th Lagrange basis polynomial on the last `order` sigmas."""

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return float(integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0])


def sample_lms(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    *,
    order: int = 4,
) -> torch.Tensor:
    """sample_lms (KSampler: order 4; SamplerLMS sets it): linear multistep on the stored derivatives."""
    s_in = _ones(x)
    # numpy float32 values, as k-diffusion passes sigmas.cpu().numpy() to quad
    sigmas_np = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _notify(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur = min(i + 1, order)
            coeffs = [lms_coefficient(cur, sigmas_np, i, j) for j in range(cur)]  # type: ignore[arg-type]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


def sample_dpmpp_2s_ancestral(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    seed: int | None,
    callback: Callback,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """sample_dpmpp_2s_ancestral (KSampler: eta = 1, s_noise = 1)."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _notify(callback, i, denoised, x)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = sigmas[i].log().neg(), sigma_down.log().neg()
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = model(x_2, s.neg().exp() * s_in)
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_2m(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_dpmpp_2m: DPM-Solver++(2M), second order from the previous denoised."""
    s_in = _ones(x)
    old_denoised: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        _notify(callback, i, denoised, x)
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        ratio = t_next.neg().exp() / t.neg().exp()
        if old_denoised is None or sigmas[i + 1] == 0:
            x = ratio * x - (-h).expm1() * denoised
        else:
            r = (t - sigmas[i - 1].log().neg()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = ratio * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_ddpm(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_ddpm (generic_step_sampler with DDPMSampler_step), in VP coordinates per step."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in)
        _notify(callback, i, denoised, x)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        alpha_cumprod = 1 / ((sigma * sigma) + 1)
        alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
        if sigma_prev > 0:
            var = (1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)
            mu += var.sqrt() * noise(sigma, sigma_prev)
        x = mu
        if sigma_prev != 0:
            x *= torch.sqrt(1.0 + sigma_prev**2.0)
    return x


def sample_lcm(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_lcm: jump to the denoised prediction, then re-noise to the next sigma."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        _notify(callback, i, denoised, x)
        x = denoised
        if sigmas[i + 1] > 0:
            # EPS noise_scaling without max_denoise: noise * sigma + latent
            x = noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] + x
    return x


def sample_ipndm(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_ipndm (max order 4): improved pseudo-numerical Adams-Bashforth steps."""
    s_in = _ones(x)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in)
        _notify(callback, i, denoised, x)
        d_cur = (x - denoised) / t_cur
        order = min(4, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x + (t_next - t_cur) * (3 * d_cur - history[-1]) / 2
        elif order == 3:
            x_next = x + (t_next - t_cur) * (23 * d_cur - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            combo = 55 * d_cur - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]
            x_next = x + (t_next - t_cur) * combo / 24
        history = (history + [d_cur])[-3:]
        x = x_next
    return x


def _ipndm_v_coefficients(h: list[float], order: int) -> list[float]:
    """Variable-step iPNDM weights for d_cur, d_{-1}, ... from step sizes h = [h_n, h_n-1, ...]."""
    h_n, h_1 = h[0], h[1]
    base = [(2 + h_n / h_1) / 2, -(h_n / h_1) / 2]
    if order == 2:
        return base
    h_2 = h[2]
    t1 = (1 - h_n / (3 * (h_n + h_1)) * (h_n * (h_n + h_1)) / (h_1 * (h_1 + h_2))) / 2
    if order == 3:
        return [base[0] + t1, base[1] - (1 + h_1 / h_2) * t1, t1 * h_1 / h_2]
    h_3 = h[3]
    t2 = (
        ((1 - h_n / (3 * (h_n + h_1))) / 2 + (1 - h_n / (2 * (h_n + h_1))) * h_n / (6 * (h_n + h_1 + h_2)))
        * (h_n * (h_n + h_1) * (h_n + h_1 + h_2))
        / (h_1 * (h_1 + h_2) * (h_1 + h_2 + h_3))
    )
    ratio = h_1 * (h_1 + h_2) / (h_2 * (h_2 + h_3))
    return [
        base[0] + t1 + t2,
        base[1] - (1 + h_1 / h_2) * t1 - (1 + (h_1 / h_2) + ratio) * t2,
        t1 * h_1 / h_2 + ((h_1 / h_2) + ratio * (1 + h_2 / h_3)) * t2,
        -t2 * ratio * h_1 / h_2,
    ]


def sample_ipndm_v(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """sample_ipndm_v (max order 4): iPNDM with coefficients for uneven steps."""
    s_in = _ones(x)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in)
        _notify(callback, i, denoised, x)
        d_cur = (x - denoised) / t_cur
        order = min(4, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            h = [t_next - t_cur] + [sigmas[i - k] - sigmas[i - k - 1] for k in range(order - 1)]
            coeffs = _ipndm_v_coefficients(h, order)  # type: ignore[arg-type]
            terms = coeffs[0] * d_cur
            for k in range(1, order):
                terms = terms + coeffs[k] * history[-k]
            x_next = x + (t_next - t_cur) * terms
        history = (history + [d_cur])[-3:]
        x = x_next
    return x
