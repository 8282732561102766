"""Latent nodes (latent_transform.py, latent_batch.py): shapes, values vs tensor arithmetic, declarations."""

from __future__ import annotations

import pytest
import torch

from nodegraph.testing import RecordingContext
from nodes.latent_batch import LatentFromBatch, RepeatLatentBatch
from nodes.latent_transform import (
    LatentBlend,
    LatentComposite,
    LatentCrop,
    LatentFlip,
    LatentRotate,
    LatentUpscaleBy,
)
from nodes.sd.noise import prepare_noise


def test_upscale_by_rounds_each_side_and_keeps_other_keys(ctx: RecordingContext) -> None:
    t = torch.randn(2, 4, 9, 13)
    src = {"samples": t, "noise_mask": torch.ones(1, 1, 72, 104)}
    (out,) = LatentUpscaleBy().run(ctx, src, "bilinear", 1.5)
    assert out["samples"].shape == (2, 4, 14, 20)  # round(13.5) = 14 (banker's), round(19.5) = 20
    expected = torch.nn.functional.interpolate(t, size=(14, 20), mode="bilinear")
    assert torch.equal(out["samples"], expected) and out["noise_mask"] is src["noise_mask"]
    assert src["samples"] is t and set(src) == {"samples", "noise_mask"}


def test_from_batch_slices_clamps_and_records_batch_index(ctx: RecordingContext) -> None:
    t = torch.arange(5 * 4 * 2 * 2, dtype=torch.float32).reshape(5, 4, 2, 2)
    masks = torch.arange(2, dtype=torch.float32).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    (out,) = LatentFromBatch().run(ctx, {"samples": t, "noise_mask": masks}, 3, 4)
    assert torch.equal(out["samples"], t[3:5]) and out["batch_index"] == [3, 4]
    # two masks cycle over five latents: items 3 and 4 take masks 1 and 0
    assert out["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 0.0]
    (clamped,) = LatentFromBatch().run(ctx, {"samples": t}, 63, 10)
    assert torch.equal(clamped["samples"], t[4:5]) and clamped["batch_index"] == [4]
    (again,) = LatentFromBatch().run(ctx, out, 1, 1)
    assert again["batch_index"] == [4]


def test_from_batch_noise_is_that_of_the_original_position(ctx: RecordingContext) -> None:
    t = torch.zeros(4, 4, 8, 8)
    full = prepare_noise(t, 7)
    (picked,) = LatentFromBatch().run(ctx, {"samples": t}, 2, 2)
    assert torch.equal(prepare_noise(picked["samples"], 7, picked["batch_index"]), full[2:4])


def test_repeat_extends_batch_index_and_masks(ctx: RecordingContext) -> None:
    t = torch.randn(2, 4, 3, 3)
    (out,) = RepeatLatentBatch().run(ctx, {"samples": t, "batch_index": [2, 3]}, 3)
    assert torch.equal(out["samples"], torch.cat([t, t, t])) and out["batch_index"] == [2, 3, 4, 5, 6, 7]
    (plain,) = RepeatLatentBatch().run(ctx, {"samples": t, "noise_mask": torch.ones(1, 1, 24, 24)}, 2)
    assert "batch_index" not in plain and plain["noise_mask"].shape == (1, 1, 24, 24)
    (masked,) = RepeatLatentBatch().run(ctx, {"samples": t, "noise_mask": torch.rand(2, 1, 24, 24)}, 2)
    assert masked["noise_mask"].shape == (4, 1, 24, 24)


def test_composite_pastes_and_clips(ctx: RecordingContext) -> None:
    to = torch.zeros(1, 4, 8, 8)
    src = torch.ones(1, 4, 6, 6)
    (out,) = LatentComposite().run(ctx, {"samples": to}, {"samples": src}, 32, 16, 0)
    expected = torch.zeros(1, 4, 8, 8)
    expected[:, :, 2:8, 4:8] = 1.0
    assert torch.equal(out["samples"], expected) and not to.any()


def test_composite_feather_ramps_inner_edges(ctx: RecordingContext) -> None:
    to = torch.zeros(1, 1, 10, 10)
    src = torch.ones(1, 1, 4, 4)
    (out,) = LatentComposite().run(ctx, {"samples": to}, {"samples": src}, 24, 24, 16)  # at (3, 3), feather 2
    weight = {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.5}  # each inner edge: 1/2, then 2/2
    for i in range(4):
        for j in range(4):
            assert out["samples"][0, 0, 3 + i, 3 + j].item() == pytest.approx(weight[i] * weight[j])
    assert out["samples"][0, 0, :3].abs().sum() == 0 and out["samples"][0, 0, 7:].abs().sum() == 0


def test_blend_and_resized_blend(ctx: RecordingContext) -> None:
    a, b = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    (out,) = LatentBlend().run(ctx, {"samples": a}, {"samples": b}, 0.25)
    assert torch.allclose(out["samples"], 0.25 * a + 0.75 * b)
    (resized,) = LatentBlend().run(ctx, {"samples": a}, {"samples": torch.randn(1, 4, 8, 8)}, 0.5)
    assert resized["samples"].shape == (1, 4, 4, 4)


def test_crop_keeps_at_least_eight_latent_pixels(ctx: RecordingContext) -> None:
    t = torch.randn(1, 4, 16, 16)
    (out,) = LatentCrop().run(ctx, {"samples": t}, 64, 128, 8, 16)
    assert torch.equal(out["samples"], t[:, :, 2:18, 1:9])
    (edge,) = LatentCrop().run(ctx, {"samples": t}, 512, 512, 1024, 1024)
    assert torch.equal(edge["samples"], t[:, :, 8:, 8:])


def test_rotate_clockwise_and_flip(ctx: RecordingContext) -> None:
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    rot = {r: LatentRotate().run(ctx, {"samples": t}, r)[0]["samples"][0, 0].tolist() for r in
           ("none", "90 degrees", "180 degrees", "270 degrees")}  # fmt: skip
    assert rot == {
        "none": [[1, 2], [3, 4]],
        "90 degrees": [[3, 1], [4, 2]],
        "180 degrees": [[4, 3], [2, 1]],
        "270 degrees": [[2, 4], [1, 3]],
    }
    (v,) = LatentFlip().run(ctx, {"samples": t}, "x-axis: vertically")
    (h,) = LatentFlip().run(ctx, {"samples": t}, "y-axis: horizontally")
    assert v["samples"][0, 0].tolist() == [[3, 4], [1, 2]] and h["samples"][0, 0].tolist() == [[2, 1], [4, 3]]
