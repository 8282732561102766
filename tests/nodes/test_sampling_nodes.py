"""KSampler and KSamplerAdvanced on a tiny random diffusers UNet: guidance, windows, progress, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.node import Interrupted
from nodegraph.testing import RecordingContext
from nodes.sampling import KSampler, KSamplerAdvanced
from nodes.sd import samplers as samplers_registry
from nodes.sd.handles import ModelHandle
from tests.nodes.tiny_unet import cond, ksampler, latent


def advanced(env: Environment, model: ModelHandle, **kw: Any) -> torch.Tensor:
    args: dict[str, Any] = dict(
        add_noise="enable",
        noise_seed=42,
        steps=6,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        positive=cond(1),
        negative=cond(2),
        latent_image=latent(),
        start_at_step=0,
        end_at_step=10000,
        return_with_leftover_noise="disable",
    )
    args.update(kw)
    (out,) = KSamplerAdvanced().run(RecordingContext(env, "ksampler"), model, **args)
    return out["samples"]


def count_batches(model: ModelHandle) -> tuple[list[int], Any]:
    sizes: list[int] = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, hook


def test_same_inputs_same_bits_and_seed_matters(env: Environment, model: ModelHandle) -> None:
    a, b = ksampler(env, model), ksampler(env, model)
    assert torch.equal(a, b)
    assert not torch.allclose(a, ksampler(env, model, seed=43))


def test_cfg_one_skips_the_uncond_pass(env: Environment, model: ModelHandle) -> None:
    sizes, hook = count_batches(model)
    try:
        ksampler(env, model, cfg=1.0)
        assert sizes == [1] * 4
        sizes.clear()
        ksampler(env, model, cfg=7.0)
        assert sizes == [2] * 4  # uncond and cond in one batch
    finally:
        hook.remove()


def test_cfg_one_ignores_the_negative(env: Environment, model: ModelHandle) -> None:
    assert torch.equal(ksampler(env, model, cfg=1.0), ksampler(env, model, cfg=1.0, negative=cond(9)))


def test_long_positive_with_short_negative_equals_separate_passes(
    env: Environment, model: ModelHandle
) -> None:
    """154 vs 77 tokens: the negative is repeated to 154 in one batch, which attention cannot tell."""
    long = cond(5, tokens=154)
    batched = ksampler(env, model, positive=long)
    repeated = [[cond(2)[0][0].repeat(1, 2, 1), {}]]
    assert torch.allclose(batched, ksampler(env, model, positive=long, negative=repeated), atol=1e-4)


def test_combined_conditioning_averages_predictions(env: Environment, model: ModelHandle) -> None:
    one, two = cond(1), cond(3)
    combined = ksampler(env, model, positive=one + two, cfg=1.0, steps=1)
    # one step of euler from sigma_max to 0 returns the denoised prediction: the mean of the two
    single_a = ksampler(env, model, positive=one, cfg=1.0, steps=1)
    single_b = ksampler(env, model, positive=two, cfg=1.0, steps=1)
    assert torch.allclose(combined, (single_a + single_b) / 2, rtol=1e-5, atol=1e-4)


def test_advanced_split_with_leftover_noise_equals_one_run(env: Environment, model: ModelHandle) -> None:
    whole = advanced(env, model)
    first = advanced(env, model, end_at_step=3, return_with_leftover_noise="enable")
    second = advanced(env, model, add_noise="disable", start_at_step=3, latent_image={"samples": first})
    assert torch.allclose(second, whole, atol=1e-5, rtol=1e-5)
    forced = advanced(env, model, end_at_step=3, return_with_leftover_noise="disable")
    assert not torch.allclose(forced, first)


def test_advanced_start_past_the_end_returns_the_input(env: Environment, model: ModelHandle) -> None:
    given = torch.randn(1, 4, 8, 8)
    assert torch.equal(advanced(env, model, start_at_step=6, latent_image={"samples": given}), given)


def test_batch_item_zero_equals_the_single_run(env: Environment, model: ModelHandle) -> None:
    single = ksampler(env, model)
    batch = ksampler(env, model, latent_image=latent(2))
    assert torch.allclose(batch[:1], single, rtol=1e-5, atol=1e-3)
    assert not torch.allclose(batch[1:], single)


class Spy:
    """Stands in for a sampler to see the start state and the sigmas KSampler hands over."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None

    def __call__(self, model: Any, x: torch.Tensor, sigmas: torch.Tensor, seed: Any, cb: Any) -> torch.Tensor:
        self.x, self.sigmas = x.clone(), sigmas.clone()
        return x


def test_denoise_start_state_uses_sigma_not_sqrt(
    env: Environment, model: ModelHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy()
    monkeypatch.setitem(samplers_registry.SAMPLERS, "euler", spy)
    start = torch.full((1, 4, 8, 8), 0.5)
    ksampler(env, model, latent_image={"samples": start}, denoise=0.5)
    assert spy.x is not None and spy.sigmas is not None and len(spy.sigmas) == 5
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    assert torch.allclose(spy.x, start * 0.18215 + noise * spy.sigmas[0], atol=1e-6)
    ksampler(env, model, latent_image=latent())
    assert torch.allclose(spy.x, noise * torch.sqrt(1 + spy.sigmas[0] ** 2), atol=1e-6)


def test_progress_every_step_with_previews(tmp_path: Any, model: ModelHandle) -> None:
    env = Environment(Folders.at(tmp_path), preview_method="auto")
    ctx = RecordingContext(env, "ksampler")
    KSampler().run(ctx, model, 42, 3, 7.0, "dpmpp_2m", "karras", cond(1), cond(2), latent(), 1.0)
    assert [(v, t) for v, t, _ in ctx.steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(p is not None and p.data[:2] == b"\xff\xd8" for _, _, p in ctx.steps)  # JPEG


def test_no_previews_when_disabled(env: Environment, model: ModelHandle) -> None:
    ctx = RecordingContext(env, "ksampler")
    KSampler().run(ctx, model, 42, 2, 7.0, "euler", "normal", cond(1), cond(2), latent(), 1.0)
    assert [p for _, _, p in ctx.steps] == [None, None]


def test_interrupt_stops_within_the_run(env: Environment, model: ModelHandle) -> None:
    ctx = RecordingContext(env, "ksampler", interrupt_after=2)
    with pytest.raises(Interrupted):
        KSampler().run(ctx, model, 42, 10, 7.0, "euler", "normal", cond(1), cond(2), latent(), 1.0)
    assert len(ctx.steps) == 2


def test_bad_inputs_name_the_input(env: Environment, model: ModelHandle) -> None:
    with pytest.raises(ValueError, match="latent_image"):
        ksampler(env, model, latent_image={"samples": torch.zeros(1, 16, 8, 8)})
    with pytest.raises(ValueError, match="positive"):
        ksampler(env, model, positive="a cat")
    with pytest.raises(ValueError, match="model"):
        ksampler(env, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive: conditioning option 'control' must be a ControlNet"):
        ksampler(env, model, positive=[[cond(1)[0][0], {"control": object()}]])
    with pytest.raises(ValueError, match="negative: embedding width 768"):
        ksampler(env, model, negative=[[torch.zeros(1, 77, 768), {}]])


@pytest.mark.parametrize("name", samplers_registry.SAMPLER_NAMES)
def test_every_sampler_runs_through_the_node(env: Environment, model: ModelHandle, name: str) -> None:
    out = ksampler(env, model, sampler_name=name, steps=3)
    assert out.shape == (1, 4, 8, 8) and bool(torch.isfinite(out).all())


def test_cfg_pp_samplers_run_the_uncond_pass_even_at_cfg_one(env: Environment, model: ModelHandle) -> None:
    sizes, hook = count_batches(model)
    try:
        ksampler(env, model, cfg=1.0, sampler_name="euler_cfg_pp", steps=2)
    finally:
        hook.remove()
    assert sizes == [2, 2]


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_noise_mask_keeps_the_unmasked_region(env: Environment, model: ModelHandle, sampler: str) -> None:
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    keep_all = ksampler(
        env, model, sampler_name=sampler, latent_image={"samples": start, "noise_mask": torch.zeros(1, 8, 8)}
    )
    assert torch.allclose(keep_all, start, atol=1e-5)
    free = ksampler(env, model, sampler_name=sampler, latent_image={"samples": start})
    masked = ksampler(
        env, model, sampler_name=sampler, latent_image={"samples": start, "noise_mask": torch.ones(1, 8, 8)}
    )
    assert torch.allclose(masked, free, atol=1e-4)
