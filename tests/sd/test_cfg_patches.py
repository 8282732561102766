"""SelfAttentionGuidance, PerpNeg, PerpNegGuider and DifferentialDiffusion against ComfyUI's
algorithms written out independently, on a tiny random diffusers UNet (two levels, attention at
level 0 and in the middle; its middle block is the latent / 2)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from nodes.sd import unet_patches
from nodes.sd.guidance import CFGDenoiser
from nodes.sd.guiders import CFGGuide, PerpNegGuide
from nodes.sd.ksampler import differential_mask, run_guided
from nodes.sd.model_sampling import EPS
from nodes.sd.samplers import SAMPLERS
from nodes.sd.schedules import karras
from nodes.sd.unet_patches import DifferentialDiffusion, PerpNeg, SelfAttention
from tests.sd.tiny_unet import WIDTH


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cond(seed: int) -> list[list[Any]]:
    return [[rand(1, 7, WIDTH, seed=seed), {}]]


def denoiser(unet: Any, positive: Any, negative: Any, cfg: float) -> CFGDenoiser:
    return CFGGuide(positive, negative, cfg).denoiser(unet, EPS, torch.device("cpu"), False, None)


def side(den: CFGDenoiser, x: torch.Tensor, which: int) -> Any:
    return den.sides_for(x.shape[2], x.shape[3], x.device, x.shape[0])[which]


def probabilities(layer: Any, hidden: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d) per head, [b, heads, n, n], from the layer's own projections."""
    q, k = layer.to_q(hidden), layer.to_k(hidden)
    b, n, inner = q.shape
    d = inner // layer.heads
    q = q.view(b, n, layer.heads, d).transpose(1, 2)
    k = k.view(b, n, layer.heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)


def blurred(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """A 9-tap Gaussian as two 1-D passes per channel, reflect padding."""
    taps = torch.tensor([math.exp(-0.5 * (i / sigma) ** 2) for i in range(-4, 5)])
    taps = taps / taps.sum()
    c = img.shape[1]
    out = F.conv2d(
        F.pad(img, (0, 0, 4, 4), mode="reflect"), taps.view(1, 1, 9, 1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(out, (4, 4, 0, 0), mode="reflect"), taps.view(1, 1, 1, 9).repeat(c, 1, 1, 1), groups=c
    )


def expected_sag(
    unet: Any, x: torch.Tensor, sigma: torch.Tensor, cfg: float, scale: float, blur_sigma: float, down: int,
    conds: tuple[Any, Any] | None = None,
) -> tuple[torch.Tensor, float]:  # fmt: skip
    """ComfyUI's SAG step computed with the plain denoiser: (result, share of the latent blurred)."""
    plain = denoiser(unet, *(conds or (cond(1), cond(2))), cfg)
    positive, negative = side(plain, x, 0), side(plain, x, 1)
    c, u = plain.predict(x, sigma, [positive, negative])
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0]), with_kwargs=True
    )
    try:
        plain.predict(x, sigma, [negative])  # the negative alone: its attention as in any batch
    finally:
        hook.remove()
    probs = probabilities(layer, seen[0])
    h, w = x.shape[2] // down, x.shape[3] // down
    mask = (probs.mean(1).sum(1) > 1.0).float().view(-1, 1, h, w)
    mask = mask.repeat_interleave(down, 2).repeat_interleave(down, 3)  # nearest upsampling
    degraded = blurred(u, blur_sigma) * mask + u * (1 - mask)
    sag = plain.predict(degraded + x - u, sigma, [negative])[0]
    return u + (c - u) * cfg + (degraded - sag) * scale, float(mask.mean())


@pytest.mark.parametrize("cfg", [6.0, 1.0])
def test_self_attention_guidance_is_comfyuis(unet: Any, cfg: float) -> None:
    x, sigma = rand(1, 4, 16, 16, seed=3) * 3.0, torch.tensor([3.0])
    with torch.no_grad():
        want, covered = expected_sag(unet, x, sigma, cfg, 0.8, 2.0, down=2)
        with unet_patches.applied(unet, [SelfAttention(0.8, 2.0)]):
            got = denoiser(unet, cond(1), cond(2), cfg)(x, sigma)
        plain = denoiser(unet, cond(1), cond(2), cfg)(x, sigma)
    assert 0.0 < covered < 1.0  # the mask blurs part of the prediction
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert type(layer.processor).__name__ != "AttentionRecorder"  # restored after the run


def test_self_attention_guidance_skips_tiny_latents(unet: Any) -> None:
    x, sigma = rand(1, 4, 4, 4, seed=3), torch.tensor([3.0])
    with torch.no_grad(), unet_patches.applied(unet, [SelfAttention(0.8, 2.0)]):
        got = denoiser(unet, cond(1), cond(2), 5.0)(x, sigma)
    with torch.no_grad():
        assert torch.allclose(got, denoiser(unet, cond(1), cond(2), 5.0)(x, sigma), atol=1e-5)


def perp_neg_formula(c: Any, u: Any, e: Any, neg_scale: float, cfg: float) -> torch.Tensor:
    p, n = (c - e).double().numpy(), (u - e).double().numpy()
    perp = n - (np.sum(n * p) / np.sum(p * p)) * p
    return torch.from_numpy(e.double().numpy() + cfg * (p - neg_scale * perp)).float()


def test_perp_neg_patch_and_guider_are_comfyuis(unet: Any) -> None:
    x, sigma = rand(2, 4, 8, 8, seed=4) * 2.0, torch.tensor([2.0, 2.0])
    with torch.no_grad():
        plain = denoiser(unet, cond(1), cond(2), 5.0)
        c, u = plain.predict(x, sigma, [side(plain, x, 0), side(plain, x, 1)])
        empty_den = denoiser(unet, cond(3), cond(3), 1.0)
        e = empty_den.predict(x, sigma, [side(empty_den, x, 1)])[0]
        want = perp_neg_formula(c, u, e, 0.7, 5.0)
        with unet_patches.applied(unet, [PerpNeg(cond(3), 0.7)]):
            patched = denoiser(unet, cond(1), cond(2), 5.0)(x, sigma)
        guide = PerpNegGuide(cond(1), cond(2), cond(3), 5.0, 0.7)
        guided = guide.denoiser(unet, EPS, torch.device("cpu"), False, None)(x, sigma)
        no_neg = PerpNegGuide(cond(1), cond(2), cond(3), 5.0, 0.0).denoiser(
            unet, EPS, torch.device("cpu"), False, None
        )
        without = no_neg(x, sigma)
    torch.testing.assert_close(patched, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(without, e + 5.0 * (c - e), rtol=1e-4, atol=1e-5)  # negative pass skipped
    assert no_neg.uncond_denoised is not None and torch.equal(no_neg.uncond_denoised, torch.zeros_like(x))


def _timestep(sigma: float) -> int:
    """ModelSamplingDiscrete.timestep: the nearest training sigma in log space."""
    table = np.log(EPS.schedule.sigmas.double().numpy())
    return int(np.abs(math.log(sigma) - table).argmin())


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_differential_mask_thresholds_by_timestep_progress(strength: float) -> None:
    sigmas = karras(EPS.schedule, 6)
    mask = torch.linspace(0, 1, 11).view(1, 1, 1, 11).expand(1, 4, 2, 11)
    function = differential_mask(strength, sigmas, EPS.schedule)
    first, last = _timestep(float(sigmas[0])), _timestep(float(EPS.schedule.sigma_min))
    for sigma in sigmas[:-1]:
        threshold = (_timestep(float(sigma)) - last) / (first - last)
        binary = (mask >= threshold).float()
        want = binary if strength == 1.0 else strength * binary + (1 - strength) * mask
        torch.testing.assert_close(function(sigma.view(1), mask), want)


def test_differential_diffusion_changes_only_soft_masked_runs(unet: Any) -> None:
    latent = rand(1, 4, 8, 8, seed=6)
    noise = rand(1, 4, 8, 8, seed=7)
    sigmas = karras(EPS.schedule, 4)

    def run(mask: torch.Tensor, patches: list[Any]) -> torch.Tensor:
        with torch.no_grad(), unet_patches.applied(unet, patches):
            value = {"samples": latent, "noise_mask": mask}
            guide = CFGGuide(cond(1), cond(2), 4.0)
            return run_guided(unet, guide, value, noise, sigmas, "euler", SAMPLERS["euler"], 0)  # type: ignore[arg-type]

    full, soft = torch.ones(1, 1, 64, 64), torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(1, 1, 64, 64)
    diff = [DifferentialDiffusion(1.0)]
    assert torch.equal(run(full, diff), run(full, []))  # a full mask passes every threshold
    assert (run(soft, diff) - run(soft, [])).abs().max() > 1e-3
