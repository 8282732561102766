"""CFG++ samplers (comfy/k_diffusion/sampling.py `*_cfg_pp`): they step along the *unconditional*
prediction and add the guidance difference, so they need the uncond x0 of every call.

The guider keeps it as `model.uncond_denoised` and evaluates the uncond side even at cfg 1
(ComfyUI's `disable_cfg1_optimization`); `nodes.sd.ksampler` sets that up for these names.
"""

from __future__ import annotations

import torch

from nodes.sd.noise import default_noise_sampler
from nodes.sd.samplers.k_diffusion import Callback, Model, _notify, _ones, ancestral_step, to_d

CFG_PP = frozenset(
    {
        "euler_cfg_pp",
        "euler_ancestral_cfg_pp",
        "dpmpp_2s_ancestral_cfg_pp",
        "dpmpp_2m_cfg_pp",
        "res_multistep_cfg_pp",
        "res_multistep_ancestral_cfg_pp",
        "gradient_estimation_cfg_pp",
    }
)


def _uncond(model: Model) -> torch.Tensor:
    uncond: torch.Tensor | None = getattr(model, "uncond_denoised", None)
    if uncond is None:
        raise RuntimeError("a CFG++ sampler needs a guider that keeps the unconditional prediction")
    return uncond


def _euler_ancestral_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback, eta: float
) -> torch.Tensor:
    """sample_euler_ancestral_cfg_pp; eta = 0 is sample_euler_cfg_pp."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond = _uncond(model)
        _notify(callback, i, denoised, x)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha_s = sigmas[i] * sigmas[i].log().neg().exp()
        alpha_t = sigmas[i + 1] * sigmas[i + 1].log().neg().exp()
        d = to_d(x, sigmas[i], alpha_s * uncond)
        sigma_down, sigma_up = ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta)
        x = alpha_t * denoised + (alpha_t * sigma_down) * d
        if eta > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
    return x


def sample_euler_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """euler_cfg_pp."""
    return _euler_ancestral_cfg_pp(model, x, sigmas, seed, callback, eta=0.0)


def sample_euler_ancestral_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """euler_ancestral_cfg_pp (eta = 1)."""
    return _euler_ancestral_cfg_pp(model, x, sigmas, seed, callback, eta=1.0)


def sample_dpmpp_2s_ancestral_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """dpmpp_2s_ancestral_cfg_pp (eta = 1)."""
    noise = default_noise_sampler(x, seed)
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond = _uncond(model)
        guidance = denoised - uncond
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        _notify(callback, i, denoised, x)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], uncond) * (sigma_down - sigmas[i])
        else:
            t, t_next = sigmas[i].log().neg(), sigma_down.log().neg()
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (s.neg().exp() / t.neg().exp()) * x - (-h * 0.5).expm1() * uncond
            model(x_2, s.neg().exp() * s_in)
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * _uncond(model)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
        x += guidance
    return x


def sample_dpmpp_2m_cfg_pp(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None, callback: Callback
) -> torch.Tensor:
    """dpmpp_2m_cfg_pp."""
    s_in = _ones(x)
    old_uncond: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        uncond = _uncond(model)
        _notify(callback, i, denoised, x)
        t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            mix = -torch.exp(-h) * uncond
        else:
            r = (t - sigmas[i - 1].log().neg()) / h
            mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x
