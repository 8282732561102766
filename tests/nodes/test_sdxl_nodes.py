"""The existing nodes on the mini SDXL checkpoint: VAE encode/decode (plain and tiled), the
conditioning nodes with SDXL's pooled output carried as ComfyUI carries it (what the UNet's added
embedding really receives is recorded), and every sampler and scheduler offered."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes.conditioning import CLIPTextEncode, ConditioningCombine
from nodes.conditioning_area import ConditioningSetArea, ConditioningSetMask
from nodes.conditioning_combine import ConditioningAverage, ConditioningConcat, ConditioningSetTimestepRange
from nodes.image import VAEDecode, VAEEncode
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.sampling import KSampler
from nodes.sd.adm import size_embedding
from nodes.sd.samplers import SAMPLER_NAMES
from nodes.sd.schedules import SCHEDULER_NAMES
from nodes.vae_tiled import VAEDecodeTiled, VAEEncodeTiled
from tests.conftest import assert_within_floor

TEMPORAL = {"temporal_size": 64, "temporal_overlap": 8}


@pytest.fixture(scope="module")
def xl(sdxl_env: Environment) -> dict[str, Any]:
    """The mini SDXL handles and three encoded prompts (each with its own pooled output)."""
    ctx = RecordingContext(sdxl_env)
    model, clip, vae = CheckpointLoaderSimple().run(ctx, "mini_sdxl.safetensors")
    prompts = {"a": "a photo of a cat", "b": "a red chair in a garden", "neg": "blurry"}
    conds = {k: CLIPTextEncode().run(ctx, text, clip)[0] for k, text in prompts.items()}
    return {"model": model, "clip": clip, "vae": vae, **conds}


def _pooled(cond: list[list[Any]]) -> torch.Tensor:
    pooled: torch.Tensor = cond[0][1]["pooled_output"]
    return pooled


@contextmanager
def added_inputs(unet: Any) -> Iterator[list[torch.Tensor]]:
    """Every `y` batch the UNet's label embedding receives ([B, 2816] per model call)."""
    seen: list[torch.Tensor] = []
    hook = unet.add_embedding.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        hook.remove()


@contextmanager
def added_inputs_by_timestep(unet: Any) -> Iterator[dict[float, list[torch.Tensor]]]:
    """The `y` rows of each model call, by the timestep of the call (its `time_proj` input)."""
    by_t: dict[float, list[torch.Tensor]] = {}
    current: list[float] = []
    hooks = [
        unet.time_proj.register_forward_pre_hook(
            lambda _m, args: current.append(float(args[0].flatten()[0]))
        ),
        unet.add_embedding.register_forward_pre_hook(
            lambda _m, args: by_t.setdefault(current[-1], []).extend(args[0].clone())
        ),
    ]
    try:
        yield by_t
    finally:
        for hook in hooks:
            hook.remove()


def _sample(env: Environment, xl: dict[str, Any], positive: Any, steps: int = 1, size: int = 32) -> Any:
    ctx = RecordingContext(env)
    latent = EmptyLatentImage().run(ctx, size, size, 1)[0]
    return KSampler().run(
        ctx, xl["model"], 7, steps, 7.0, "euler", "normal", positive, xl["neg"], latent, 1.0
    )[0]


def _has_row(rows: torch.Tensor, pooled: torch.Tensor) -> bool:
    return any(torch.allclose(r[:1280], pooled[0], atol=1e-6) for r in rows)


# ---- VAE


def test_vae_encode_decode_and_their_tiled_versions_on_the_sdxl_vae(sdxl_env: Environment, xl: dict) -> None:
    ctx = RecordingContext(sdxl_env)
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    (latent,) = VAEEncode().run(ctx, pixels, xl["vae"])
    with torch.no_grad():  # the LATENT is the VAE's own posterior mean: no 0.13025 in it
        want = xl["vae"].vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    assert_within_floor(latent["samples"], want)
    (image,) = VAEDecode().run(ctx, latent, xl["vae"])
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    (tiled_latent,) = VAEEncodeTiled().run(ctx, pixels, xl["vae"], 512, 64, **TEMPORAL)
    (tiled_image,) = VAEDecodeTiled().run(ctx, latent, xl["vae"], 512, 64, **TEMPORAL)
    assert_within_floor(tiled_latent["samples"], latent["samples"])  # one tile covers the image
    assert_within_floor(tiled_image, image)
    big = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(2))
    (big_latent,) = VAEEncode().run(ctx, big, xl["vae"])
    (whole,) = VAEDecode().run(ctx, big_latent, xl["vae"])
    (tiles,) = VAEDecodeTiled().run(ctx, big_latent, xl["vae"], 64, 32, **TEMPORAL)  # 8x8 latent tiles
    assert tiles.shape == whole.shape == (1, 96, 96, 3) and torch.isfinite(tiles).all()
    assert float((tiles - whole).abs().mean()) < 0.25  # a random VAE is not tile-local; still close


# ---- conditioning nodes: each entry's pooled output reaches the UNet as ComfyUI sends it


def test_combine_sends_each_entry_with_its_own_pooled_output(sdxl_env: Environment, xl: dict) -> None:
    both = ConditioningCombine().run(RecordingContext(sdxl_env), xl["a"], xl["b"])[0]
    with added_inputs(xl["model"].unet) as seen:
        _sample(sdxl_env, xl, both)
    rows = torch.cat(seen)
    assert rows.shape[-1] == 2816
    assert all(_has_row(rows, _pooled(xl[k])) for k in ("a", "b", "neg"))
    sizes = size_embedding(torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]))[0]
    assert all(torch.allclose(r[1280:], sizes) for r in rows)  # CLIPTextEncode: latent size x 8


def test_concat_keeps_the_first_pooled_output_and_average_mixes_them(sdxl_env: Environment, xl: dict) -> None:
    ctx = RecordingContext(sdxl_env)
    [[cond, options]] = ConditioningConcat().run(ctx, xl["a"], xl["b"])[0]
    assert cond.shape == (1, 154, 2048) and torch.equal(options["pooled_output"], _pooled(xl["a"]))
    [[mixed, mixed_options]] = ConditioningAverage().run(ctx, xl["a"], xl["b"], 0.75)[0]
    want = _pooled(xl["a"]) * 0.75 + _pooled(xl["b"]) * 0.25
    assert torch.equal(mixed_options["pooled_output"], want)
    assert torch.equal(mixed, xl["a"][0][0] * 0.75 + xl["b"][0][0] * 0.25)
    for positive, pooled in (([[cond, options]], _pooled(xl["a"])), ([[mixed, mixed_options]], want)):
        with added_inputs(xl["model"].unet) as seen:
            out = _sample(sdxl_env, xl, positive)
        assert torch.isfinite(out["samples"]).all() and _has_row(torch.cat(seen), pooled)


def test_area_and_mask_prompts_keep_the_full_image_size_conditioning(sdxl_env: Environment, xl: dict) -> None:
    ctx = RecordingContext(sdxl_env)
    area = ConditioningSetArea().run(ctx, xl["b"], 64, 64, 64, 0, 1.0)[0]
    mask = torch.zeros(128, 128)
    mask[64:] = 1.0
    masked = ConditioningSetMask().run(ctx, xl["b"], mask, 1.0, "default")[0]
    for extra in (area, masked):
        positive = ConditioningCombine().run(ctx, xl["a"], extra)[0]
        with added_inputs(xl["model"].unet) as seen:
            out = _sample(sdxl_env, xl, positive, size=128)
        rows = torch.cat(seen)
        assert torch.isfinite(out["samples"]).all() and _has_row(rows, _pooled(xl["b"]))
        # ComfyUI sizes every entry by the whole latent (encode_model_conds), not by its area
        sizes = size_embedding(torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]))[0]
        assert all(torch.allclose(r[1280:], sizes) for r in rows)


def test_timestep_ranges_choose_which_pooled_output_each_step_sends(sdxl_env: Environment, xl: dict) -> None:
    ctx = RecordingContext(sdxl_env)
    early = ConditioningSetTimestepRange().run(ctx, xl["a"], 0.0, 0.5)[0]
    late = ConditioningSetTimestepRange().run(ctx, xl["b"], 0.5, 1.0)[0]
    positive = ConditioningCombine().run(ctx, early, late)[0]
    with added_inputs_by_timestep(xl["model"].unet) as by_t:
        # normal schedule, 2 steps: timesteps 999 and 0 (ComfyUI's linspace(999, 0, steps)); a 3rd
        # step would sit at 499.5, the very boundary both ranges include
        _sample(sdxl_env, xl, positive, steps=2)
    steps = [torch.stack(by_t[t]) for t in sorted(by_t, reverse=True)]
    assert len(steps) == 2
    sent = [(_has_row(rows, _pooled(xl["a"])), _has_row(rows, _pooled(xl["b"]))) for rows in steps]
    assert sent == [(True, False), (False, True)]
    assert all(_has_row(rows, _pooled(xl["neg"])) for rows in steps)


# ---- every sampler and scheduler: one step each on a 32x32 image (a 4x4 latent)

_TIMES: list[float] = []


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [(s, "normal") for s in SAMPLER_NAMES] + [("euler", s) for s in SCHEDULER_NAMES if s != "normal"],
)
def test_every_sampler_and_scheduler_runs_on_sdxl(
    sdxl_env: Environment, xl: dict, sampler: str, scheduler: str
) -> None:
    ctx = RecordingContext(sdxl_env)
    latent = EmptyLatentImage().run(ctx, 32, 32, 1)[0]
    start = time.perf_counter()
    with added_inputs(xl["model"].unet) as seen:
        out = KSampler().run(
            ctx, xl["model"], 3, 1, 7.0, sampler, scheduler, xl["a"], xl["neg"], latent, 1.0
        )[0]
    _TIMES.append(time.perf_counter() - start)
    samples = out["samples"]
    assert samples.shape == (1, 4, 4, 4) and torch.isfinite(samples).all() and samples.abs().max() > 0
    if sampler == "dpm_adaptive":  # ComfyUI: at one step its sigma_min is sigma_max, no model call
        assert not seen
        return
    assert seen and all(y.shape[-1] == 2816 for y in seen)  # SDXL's added conditioning on every call
    print(f"{sampler}/{scheduler}: {_TIMES[-1]:.2f} s, {len(seen)} UNet calls (total {sum(_TIMES):.1f} s)")
