"""Conditioning nodes: ConditioningAverage, ConditioningConcat, ConditioningSetTimestepRange."""

from __future__ import annotations

import torch

from nodegraph.testing import RecordingContext
from nodes.conditioning_combine import ConditioningAverage, ConditioningConcat, ConditioningSetTimestepRange
from nodes.sd.guidance import cond_entries
from nodes.sd.schedules import sd15_schedule


def test_average_lerps_and_pads_or_cuts_from(ctx: RecordingContext) -> None:
    to = torch.randn(1, 154, 8)
    short_from, long_from = torch.randn(1, 77, 8), torch.randn(1, 231, 8)
    pooled_to, pooled_from = torch.randn(1, 8), torch.randn(1, 8)
    (out,) = ConditioningAverage().run(
        ctx,
        [[to, {"pooled_output": pooled_to, "x": 1}]],
        [[short_from, {"pooled_output": pooled_from}]],
        0.75,
    )
    expected = to * 0.75 + torch.cat([short_from, torch.zeros(1, 77, 8)], dim=1) * 0.25
    assert torch.allclose(out[0][0], expected)
    assert torch.allclose(out[0][1]["pooled_output"], pooled_to * 0.75 + pooled_from * 0.25)
    assert out[0][1]["x"] == 1
    (cut,) = ConditioningAverage().run(ctx, [[to, {}]], [[long_from, {"pooled_output": pooled_from}]], 0.5)
    assert torch.allclose(cut[0][0], to * 0.5 + long_from[:, :154] * 0.5)
    # `to` without a pooled output: interpolating with the fallback leaves `from`'s
    assert torch.allclose(cut[0][1]["pooled_output"], pooled_from)


def test_average_and_concat_use_only_the_first_from_entry(ctx: RecordingContext) -> None:
    to = [[torch.randn(1, 77, 8), {"a": 1}], [torch.randn(1, 77, 8), {}]]
    src = [[torch.randn(1, 77, 8), {}], [torch.randn(1, 77, 8), {}]]
    (avg,) = ConditioningAverage().run(ctx, to, src, 0.0)
    assert all(torch.equal(entry[0], src[0][0]) for entry in avg) and len(ctx.warnings) == 1
    (cat,) = ConditioningConcat().run(ctx, to, src)
    assert [tuple(e[0].shape) for e in cat] == [(1, 154, 8), (1, 154, 8)]
    assert torch.equal(cat[1][0], torch.cat([to[1][0], src[0][0]], dim=1)) and cat[0][1] == {"a": 1}
    assert cat[0][1] is not to[0][1] and len(ctx.warnings) == 2


def test_timestep_range_sets_percents_that_guidance_reads(ctx: RecordingContext) -> None:
    cond = [[torch.randn(1, 77, 768), {"pooled_output": None}]]
    (out,) = ConditioningSetTimestepRange().run(ctx, cond, 0.25, 0.75)
    assert out[0][1] == {"pooled_output": None, "start_percent": 0.25, "end_percent": 0.75}
    assert cond[0][1] == {"pooled_output": None}
    schedule = sd15_schedule()
    (entry,) = cond_entries(out, schedule, "positive", width=768)
    assert entry.sigma_start == float(schedule.sigma(torch.tensor(0.75 * 999.0)))
    assert entry.sigma_end == float(schedule.sigma(torch.tensor(0.25 * 999.0)))
    assert entry.sigma_start > entry.sigma_end
