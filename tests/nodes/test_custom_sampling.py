"""Custom sampling on a tiny random UNet: the pieces recombine into KSampler, and each piece follows
ComfyUI's formula (schedulers, split/flip, guiders, sampler options)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes import custom_sampling as cs
from nodes import sigmas as sn
from nodes.sd.handles import ModelHandle
from nodes.sd.schedules import sd15_schedule
from tests.nodes.tiny_unet import cond, guided_euler, ksampler, latent


def custom(env: Environment, model: ModelHandle, sampler: Any, sigmas: torch.Tensor, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        add_noise=True, noise_seed=42, cfg=7.0, positive=cond(1), negative=cond(2), latent_image=latent()
    )
    args.update(kw)
    return cs.SamplerCustom().run(
        RecordingContext(env, "ksampler"), model, sampler=sampler, sigmas=sigmas, **args
    )


def test_sampler_custom_with_basic_scheduler_is_ksampler(env: Environment, model: ModelHandle) -> None:
    ctx = RecordingContext(env, "ksampler")
    for name, scheduler in (("euler_ancestral", "karras"), ("dpmpp_2m", "normal")):
        (sigmas,) = sn.BasicScheduler().run(ctx, model, scheduler, 3, 1.0)
        (sampler,) = cs.KSamplerSelect().run(ctx, name)
        out, denoised = custom(env, model, sampler, sigmas)
        want = ksampler(env, model, sampler_name=name, scheduler=scheduler, steps=3)
        assert torch.equal(out["samples"], want)
        assert denoised["samples"].shape == out["samples"].shape  # the last step's x0


def test_advanced_with_cfg_guider_equals_sampler_custom(env: Environment, model: ModelHandle) -> None:
    ctx = RecordingContext(env, "ksampler")
    (sigmas,) = sn.KarrasScheduler().run(ctx, 3, 14.614642, 0.0291675, 7.0)
    (sampler,) = sn.SamplerEulerAncestral().run(ctx, 1.0, 1.0)
    (guider,) = cs.CFGGuider().run(ctx, model, cond(1), cond(2), 6.5)
    (noise,) = cs.RandomNoise().run(ctx, 42)
    a, _ = cs.SamplerCustomAdvanced().run(ctx, noise, guider, sampler, sigmas, latent())
    b, _ = custom(env, model, sampler, sigmas, cfg=6.5)
    assert torch.equal(a["samples"], b["samples"])
    (plain,) = cs.KSamplerSelect().run(ctx, "euler_ancestral")
    c, _ = custom(env, model, plain, sigmas, cfg=6.5)
    assert torch.equal(c["samples"], b["samples"])  # default options are KSampler's
    (eta0,) = sn.SamplerEulerAncestral().run(ctx, 0.0, 1.0)
    (euler,) = cs.KSamplerSelect().run(ctx, "euler")
    d, _ = custom(env, model, eta0, sigmas, cfg=6.5)
    e, _ = custom(env, model, euler, sigmas, cfg=6.5)
    assert torch.allclose(d["samples"], e["samples"], rtol=1e-5, atol=1e-4)  # eta 0 is plain euler


def test_guiders(env: Environment, model: ModelHandle) -> None:
    ctx = RecordingContext(env, "ksampler")

    def run(guider: Any) -> torch.Tensor:
        return guided_euler(ctx, model, guider)

    (basic,) = cs.BasicGuider().run(ctx, model, cond(1))
    (cfg1,) = cs.CFGGuider().run(ctx, model, cond(1), cond(2), 1.0)
    assert torch.equal(run(basic), run(cfg1))
    # Dual, regular, cfg_cond2_negative 1: only cond1 and cond2 run: cond2 + (cond1 - cond2)·cfg
    (dual,) = cs.DualCFGGuider().run(ctx, model, cond(1), cond(3), cond(2), 4.0, 1.0, "regular")
    (two,) = cs.CFGGuider().run(ctx, model, cond(1), cond(3), 4.0)
    assert torch.allclose(run(dual), run(two), rtol=1e-5, atol=1e-4)
    (nested,) = cs.DualCFGGuider().run(ctx, model, cond(1), cond(3), cond(2), 1.0, 5.0, "nested")
    (neg,) = cs.CFGGuider().run(ctx, model, cond(1), cond(2), 5.0)
    assert torch.allclose(run(nested), run(neg), rtol=1e-5, atol=1e-4)  # cfg_conds 1: cond1 vs negative


def test_disable_noise_samples_the_latent_as_it_is(env: Environment, model: ModelHandle) -> None:
    ctx = RecordingContext(env, "ksampler")
    (sigmas,) = sn.BasicScheduler().run(ctx, model, "normal", 3, 1.0)
    (sampler,) = cs.KSamplerSelect().run(ctx, "euler")
    start = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    a, _ = custom(env, model, sampler, sigmas, add_noise=False, latent_image=start)
    (noise,) = cs.DisableNoise().run(ctx)
    (guider,) = cs.CFGGuider().run(ctx, model, cond(1), cond(2), 7.0)
    b, _ = cs.SamplerCustomAdvanced().run(ctx, noise, guider, sampler, sigmas, start)
    assert torch.equal(a["samples"], b["samples"])


def test_scheduler_values_follow_comfyui(model: ModelHandle) -> None:
    ctx = RecordingContext(None)  # type: ignore[arg-type]
    (turbo,) = sn.SDTurboScheduler().run(ctx, model, 4, 1.0)
    np.testing.assert_allclose(turbo.numpy(), [14.614640, 8.302803, 5.087763, 3.321083, 0], rtol=1e-6)
    (ays,) = sn.AlignYourStepsScheduler().run(ctx, "SD1", 6, 1.0)
    np.testing.assert_allclose(
        ays.numpy(), [14.614641, 4.589205, 2.391697, 1.394380, 0.743122, 0.288335, 0], atol=1e-6
    )
    (karras,) = sn.KarrasScheduler().run(ctx, 6, 14.614642, 0.0291675, 7.0)
    ramp = np.linspace(0, 1, 6, dtype=np.float64)
    lo, hi = 0.0291675 ** (1 / 7), 14.614642 ** (1 / 7)
    np.testing.assert_allclose(karras.numpy(), [*((hi + ramp * (lo - hi)) ** 7), 0], rtol=1e-5)
    (expo,) = sn.ExponentialScheduler().run(ctx, 5, 10.0, 0.1)
    np.testing.assert_allclose(expo.numpy(), [10, 10**0.5, 1, 10**-0.5, 0.1, 0], rtol=1e-5)
    (poly,) = sn.PolyexponentialScheduler().run(ctx, 5, 10.0, 0.1, 1.0)
    np.testing.assert_allclose(poly.numpy(), expo.numpy(), rtol=1e-5)  # rho 1 is exponential
    (basic,) = sn.BasicScheduler().run(ctx, model, "normal", 4, 0.5)
    full = sn.BasicScheduler().run(ctx, model, "normal", 8, 1.0)[0]
    assert torch.equal(basic, full[-5:])
    assert math.isclose(float(sd15_schedule().sigma_max), float(turbo[0]), rel_tol=1e-6)


def test_split_and_flip() -> None:
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    high, low = sn.SplitSigmas().run(None, sigmas, 2)  # type: ignore[arg-type]
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = sn.SplitSigmasDenoise().run(None, sigmas, 0.5)  # type: ignore[arg-type]
    assert high.tolist() == [10.0, 5.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    (flipped,) = sn.FlipSigmas().run(None, sigmas)  # type: ignore[arg-type]
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 5.0, 10.0])
    assert sigmas.tolist() == [10.0, 5.0, 2.0, 1.0, 0.0]  # the input is not changed


def test_bad_sigmas_name_the_input(env: Environment, model: ModelHandle) -> None:
    (sampler,) = cs.KSamplerSelect().run(RecordingContext(env, "ksampler"), "euler")
    with pytest.raises(ValueError, match="sigmas"):
        custom(env, model, sampler, "not sigmas")  # type: ignore[arg-type]


def test_a_one_sigma_schedule_gives_the_seeds_noise_as_a_latent(env: Environment, model: ModelHandle) -> None:
    """A1111's inpainting_fill 2 ("latent noise") in core nodes (nodegraph/server/a1111.py): SamplerCustom
    with add_noise on zeros and the schedule [1.0] (KarrasScheduler 1 step from 1 to 1, SplitSigmas at
    0) runs no model step and returns the seed's noise, unscaled to VAE space: the same draw the
    KSampler takes for that seed and batch, which is what A1111 puts under the mask."""
    from nodes.sd.ksampler import latent_scale
    from nodes.sd.noise import prepare_noise

    ctx = RecordingContext(env, "noise")
    (karras,) = sn.KarrasScheduler().run(ctx, 1, 1.0, 1.0, 7.0)
    high, _ = sn.SplitSigmas().run(ctx, karras, 0)
    assert high.tolist() == [1.0]
    (sampler,) = cs.KSamplerSelect().run(ctx, "euler")
    out, _ = custom(env, model, sampler, high, noise_seed=5, cfg=1.0, latent_image=latent(2))
    want = prepare_noise(torch.zeros(2, 4, 8, 8), 5, None) / latent_scale(model.unet)
    assert torch.allclose(out["samples"], want, rtol=0, atol=1e-6)
    assert not torch.equal(want[0], want[1])  # one draw per image of the batch, as the KSampler's
