"""Latent arithmetic against ComfyUI's formulas written out independently (loops, numpy float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from nodegraph.testing import RecordingContext
from nodes.latent_math import (
    LatentAdd,
    LatentBatch,
    LatentBatchSeedBehavior,
    LatentInterpolate,
    LatentMultiply,
    LatentSubtract,
)
from nodes.sd.noise import prepare_noise
from nodes.sd.values import Latent


def latent(*shape: int, seed: int = 0, **extra: object) -> Latent:
    out: Latent = {"samples": torch.randn(*shape, generator=torch.Generator().manual_seed(seed))}
    out.update(extra)  # type: ignore[typeddict-item]
    return out


def test_add_and_subtract_resize_and_batch_the_second(ctx: RecordingContext) -> None:
    mask = torch.ones(1, 1, 64, 64)
    a, b = latent(2, 4, 8, 8, noise_mask=mask), latent(1, 4, 4, 4, seed=1)
    resized = F.interpolate(b["samples"], size=(8, 8), mode="bilinear").repeat(2, 1, 1, 1)
    (added,) = LatentAdd().run(ctx, a, b)
    (subtracted,) = LatentSubtract().run(ctx, a, b)
    torch.testing.assert_close(added["samples"], a["samples"] + resized)
    torch.testing.assert_close(subtracted["samples"], a["samples"] - resized)
    assert added["noise_mask"] is mask  # samples1's mask travels on
    assert torch.equal(a["samples"], latent(2, 4, 8, 8)["samples"])  # inputs untouched
    (scaled,) = LatentMultiply().run(ctx, a, -2.5)
    torch.testing.assert_close(scaled["samples"], a["samples"] * -2.5)


def test_add_centre_crops_another_aspect(ctx: RecordingContext) -> None:
    a, b = latent(1, 4, 8, 8), latent(1, 4, 8, 16, seed=1)
    (added,) = LatentAdd().run(ctx, a, b)
    torch.testing.assert_close(added["samples"], a["samples"] + b["samples"][..., 4:12])


def test_interpolate_blends_direction_and_magnitude_per_pixel(ctx: RecordingContext) -> None:
    a, b = latent(1, 4, 6, 5), latent(1, 4, 6, 5, seed=1)
    a["samples"][0, :, 0, 0] = 0.0  # a zero vector: its direction counts as zero
    ratio = 0.3
    (out,) = LatentInterpolate().run(ctx, a, b, ratio)
    s1, s2 = a["samples"][0].double().numpy(), b["samples"][0].double().numpy()
    want = np.zeros_like(s1)
    for y in range(6):
        for x in range(5):
            v1, v2 = s1[:, y, x], s2[:, y, x]
            m1, m2 = np.linalg.norm(v1), np.linalg.norm(v2)
            d1 = v1 / m1 if m1 > 0 else np.zeros(4)
            t = d1 * ratio + (v2 / m2) * (1 - ratio)
            want[:, y, x] = t / np.linalg.norm(t) * (m1 * ratio + m2 * (1 - ratio))
    np.testing.assert_allclose(out["samples"][0].numpy(), want, rtol=1e-5, atol=1e-6)


def test_interpolate_of_a_batch_says_what_to_do(ctx: RecordingContext) -> None:
    with pytest.raises(ValueError, match="LatentInterpolate: a batch of 2"):
        LatentInterpolate().run(ctx, latent(2, 4, 6, 5), latent(2, 4, 6, 5), 0.5)


def test_other_channel_count_is_refused(ctx: RecordingContext) -> None:
    with pytest.raises(ValueError, match="LatentAdd: samples2 has 16 channels"):
        LatentAdd().run(ctx, latent(1, 4, 8, 8), latent(1, 16, 8, 8))
    with pytest.raises(ValueError, match="LatentSubtract: input samples1"):
        LatentSubtract().run(ctx, {"samples": torch.zeros(4, 8, 8)}, latent(1, 4, 8, 8))


def test_batch_joins_and_numbers_the_noise(ctx: RecordingContext) -> None:
    a, b = latent(2, 4, 8, 8), latent(1, 4, 4, 4, seed=1, batch_index=[5])
    (out,) = LatentBatch().run(ctx, a, b)
    assert out["samples"].shape == (3, 4, 8, 8) and out["batch_index"] == [0, 1, 5]
    torch.testing.assert_close(out["samples"][2:], F.interpolate(b["samples"], size=(8, 8), mode="bilinear"))


def test_seed_behavior_fixed_gives_every_latent_the_first_noise(ctx: RecordingContext) -> None:
    (fixed,) = LatentBatchSeedBehavior().run(ctx, latent(3, 4, 8, 8, batch_index=[4, 5, 6]), "fixed")
    assert fixed["batch_index"] == [4, 4, 4]
    (plain,) = LatentBatchSeedBehavior().run(ctx, latent(3, 4, 8, 8), "fixed")
    noise = prepare_noise(plain["samples"], 7, plain["batch_index"])
    assert torch.equal(noise[0], noise[2]) and not torch.equal(
        noise[0], prepare_noise(plain["samples"], 7)[1]
    )
    (rand,) = LatentBatchSeedBehavior().run(ctx, fixed, "random")
    assert "batch_index" not in rand and "batch_index" in fixed
