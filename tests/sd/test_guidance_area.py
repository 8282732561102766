"""Area and mask conditioning in guidance, on the real mini UNet, against ComfyUI's formulas.

comfy/samplers.py: an area entry predicts on its crop of the latent with weight strength x a
linear ramp over min(8, size // 4) latent pixels at each edge that lies inside the latent; a mask
entry weighs by the mask (bilinear to the latent) x mask_strength x strength; each side is
sum(pred * mult) / (1e-37 + sum(mult)); each area entry gets a twin with the other side's
embedding. The references below are computed crop by crop, from the UNet, in the test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodes.conditioning_area import (
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
)
from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.guidance import CFGDenoiser, ConditioningError, cond_entries, resolve_entry
from nodes.sd.schedules import sd15_schedule
from tests.conftest import assert_within_floor

H, W = 16, 32  # latent size (a 128 x 256 image)
SIGMA = torch.tensor([2.5])
CTX: Any = None  # the area nodes do not use their run context


class RecordingUNet:
    """The real UNet, with the input shape of every call recorded."""

    def __init__(self, unet: Any) -> None:
        self.unet, self.shapes = unet, []  # type: list[tuple[int, ...]]

    def parameters(self) -> Any:
        return self.unet.parameters()

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.shapes.append(tuple(x.shape))
        return self.unet(x, *args, **kwargs)


@pytest.fixture(scope="module")
def unet(loaded_mini: LoadedCheckpoint) -> Any:
    return loaded_mini.unet


@pytest.fixture(scope="module")
def embeddings() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {name: torch.randn(1, 77, 768, generator=gen) for name in ("a", "b", "neg", "bg")}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 4, H, W, generator=torch.Generator().manual_seed(3)) * 2.5


def x0(unet: Any, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """One crop's denoised prediction: EPS model, x / sqrt(sigma^2 + 1) in, x - eps * sigma out."""
    t = sd15_schedule().timestep(SIGMA).float()
    dtype = next(unet.parameters()).dtype
    xc = (x / (SIGMA**2 + 1.0) ** 0.5).to(dtype)
    eps = unet(xc, t, encoder_hidden_states=emb.to(dtype), return_dict=False)[0].float()
    return x - eps * SIGMA


def denoiser(unet: Any, positive: list[Any], negative: list[Any], cfg: float) -> CFGDenoiser:
    schedule = sd15_schedule()
    return CFGDenoiser(
        unet,
        schedule,
        cond_entries(positive, schedule, "positive"),
        cond_entries(negative, schedule, "negative"),
        cfg,
    )


def test_area_over_the_whole_latent_equals_the_plain_cond(
    unet: Any, embeddings: dict, x: torch.Tensor
) -> None:
    plain = [[embeddings["a"], {}]]
    (whole,) = ConditioningSetArea().run(CTX, plain, W * 8, H * 8, 0, 0, 1.0)
    negative = [[embeddings["neg"], {}]]
    expected = denoiser(unet, plain, negative, 7.5)(x, SIGMA)
    got = denoiser(unet, whole, negative, 7.5)(x, SIGMA)
    assert_within_floor(got, expected)  # the area path batches differently: kernel noise only


def test_two_areas_against_comfyuis_formula(unet: Any, embeddings: dict, x: torch.Tensor) -> None:
    (left,) = ConditioningSetArea().run(CTX, [[embeddings["a"], {}]], 160, 128, 0, 0, 1.0)  # 16x20 at 0,0
    (right,) = ConditioningSetArea().run(CTX, [[embeddings["b"], {}]], 160, 96, 96, 32, 1.0)  # 12x20 at 4,12
    (right,) = ConditioningSetAreaStrength().run(CTX, right, 2.5)
    assert left[0][1]["area"] == (16, 20, 0, 0) and right[0][1] == {
        "area": (12, 20, 4, 12), "strength": 2.5, "set_area_to_bounds": False
    }  # fmt: skip
    recorder = RecordingUNet(unet)
    guider = denoiser(recorder, left + right, [[embeddings["neg"], {}]], 7.5)
    got = guider(x, SIGMA)

    # the ramps, written out: left's right edge (ramp 5), right's top (ramp 3) and left (ramp 5) edges
    m_left = torch.ones(16, 20)
    m_left[:, 15:] *= torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])
    m_right = torch.full((12, 20), 2.5)
    m_right[:3, :] *= torch.tensor([1 / 3, 2 / 3, 1.0])[:, None]
    m_right[:, :5] *= torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0])
    regions = {"left": (slice(0, 16), slice(0, 20), m_left), "right": (slice(4, 16), slice(12, 32), m_right)}

    def side(full: list[str], areas: dict[str, str]) -> torch.Tensor:
        out, count = torch.zeros_like(x), torch.full_like(x, 1e-37)
        for name in full:
            out += x0(unet, x, embeddings[name])
            count += 1.0
        for region, name in areas.items():
            rows, cols, mult = regions[region]
            out[:, :, rows, cols] += x0(unet, x[:, :, rows, cols], embeddings[name]) * mult
            count[:, :, rows, cols] += mult
        return out / count

    cond = side([], {"left": "a", "right": "b"})
    # the negative gets twins of both areas (with their ramps and strength) carrying its embedding
    uncond = side(["neg"], {"left": "neg", "right": "neg"})
    torch.testing.assert_close(got, uncond + (cond - uncond) * 7.5, rtol=1e-4, atol=1e-4)
    # no positive covers the top right: cond is 0 there, so the result is uncond * (1 - cfg)
    torch.testing.assert_close(got[:, :, :4, 20:], uncond[:, :, :4, 20:] * -6.5, rtol=1e-4, atol=1e-4)
    # same-shape crops share a batch (each area with its twin), the full negative runs alone
    assert recorder.shapes == [(2, 4, 16, 20), (2, 4, 12, 20), (1, 4, 16, 32)]
    _, negative = guider.sides_for(H, W)
    assert [e.area for e in negative] == [None, (16, 20, 0, 0), (12, 20, 4, 12)]
    assert all(e.cross_attn is embeddings["neg"] for e in negative)


def test_mask_of_ones_equals_the_plain_cond(unet: Any, embeddings: dict, x: torch.Tensor) -> None:
    plain = [[embeddings["a"], {}]]
    (masked,) = ConditioningSetMask().run(CTX, plain, torch.ones(128, 256), 1.0, "default")
    negative = [[embeddings["neg"], {}]]
    expected = denoiser(unet, plain, negative, 7.5)(x, SIGMA)
    torch.testing.assert_close(denoiser(unet, masked, negative, 7.5)(x, SIGMA), expected, rtol=0, atol=0)


def _image_mask() -> torch.Tensor:
    mask = torch.zeros(1, 128, 256)
    mask[:, 40:104, 64:144] = 1.0
    mask[:, 50:60, 100:130] = 0.5
    return mask


def test_half_mask_against_comfyuis_formula(unet: Any, embeddings: dict, x: torch.Tensor) -> None:
    mask = torch.zeros(128, 256)
    mask[:, :100] = 1.0  # edge at pixel 100: bilinear gives a fractional latent column
    (masked,) = ConditioningSetMask().run(CTX, [[embeddings["a"], {}]], mask, 0.8, "default")
    got = denoiser(unet, masked + [[embeddings["bg"], {}]], [[embeddings["neg"], {}]], 1.0)(x, SIGMA)
    m = torch.nn.functional.interpolate(mask[None, None], size=(H, W), mode="bilinear")[0] * 0.8
    assert float(m[0, 0, 12]) == pytest.approx(0.4)  # the column across the edge: half of 0.8
    expected = (x0(unet, x, embeddings["a"]) * m + x0(unet, x, embeddings["bg"])) / (1e-37 + m + 1.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mask_bounds_predicts_on_the_masks_bounding_box(unet: Any, embeddings: dict, x: torch.Tensor) -> None:
    (masked,) = ConditioningSetMask().run(CTX, [[embeddings["a"], {}]], _image_mask(), 1.5, "mask bounds")
    assert masked[0][1]["set_area_to_bounds"] is True and masked[0][1]["mask_strength"] == 1.5
    recorder = RecordingUNet(unet)
    guider = denoiser(recorder, masked, [[embeddings["neg"], {}]], 1.0)
    got = guider(x, SIGMA)
    m = torch.nn.functional.interpolate(_image_mask()[None], size=(H, W), mode="bilinear")[0]
    rows, cols = torch.nonzero(m[0], as_tuple=True)
    y, x_ = int(rows.min()), int(cols.min())
    area = (max(8, int(rows.max()) - y + 1), max(8, int(cols.max()) - x_ + 1), y, x_)
    assert area == (8, 10, 5, 8)
    (entry,) = guider.sides_for(H, W)[0]
    assert entry.area == area
    assert recorder.shapes == [(1, 4, 8, 10)]  # only the crop; at cfg 1 the negative never runs
    crop = (slice(5, 13), slice(8, 18))
    mult = m[:, crop[0], crop[1]] * 1.5
    expected = torch.zeros_like(x)
    expected[:, :, crop[0], crop[1]] = (
        x0(unet, x[:, :, crop[0], crop[1]], embeddings["a"]) * mult / (1e-37 + mult)
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_percentage_area_is_the_same_as_the_pixel_area(unet: Any, embeddings: dict, x: torch.Tensor) -> None:
    cond = [[embeddings["a"], {}]]
    (pct,) = ConditioningSetAreaPercentage().run(CTX, cond, 0.5, 1.0, 0.25, 0.0, 1.0)
    assert pct[0][1]["area"] == ("percentage", 1.0, 0.5, 0.0, 0.25)
    (px,) = ConditioningSetArea().run(CTX, cond, 128, 128, 64, 0, 1.0)
    schedule = sd15_schedule()
    (entry,) = cond_entries(pct, schedule, "positive")
    assert resolve_entry(entry, H, W).area == (16, 16, 0, 8)
    tiny = resolve_entry(
        entry.__class__(cross_attn=entry.cross_attn, area=("percentage", 0.01, 0.01, 0.5, 0.5)), H, W
    )
    assert tiny.area == (1, 1, 8, 16)  # at least one latent pixel
    negative = [[embeddings["neg"], {}]]
    torch.testing.assert_close(
        denoiser(unet, pct, negative, 5.0)(x, SIGMA),
        denoiser(unet, px, negative, 5.0)(x, SIGMA),
        rtol=0,
        atol=0,
    )


def test_bad_areas_and_masks_are_clear_errors(unet: Any, embeddings: dict, x: torch.Tensor) -> None:
    schedule = sd15_schedule()
    with pytest.raises(ConditioningError, match="positive: conditioning area must be"):
        cond_entries([[embeddings["a"], {"area": (1, 2)}]], schedule, "positive")
    with pytest.raises(ConditioningError, match="positive: conditioning area must be"):
        cond_entries([[embeddings["a"], {"area": (0, 8, 0, 0)}]], schedule, "positive")
    with pytest.raises(ConditioningError, match="negative: conditioning mask must be a MASK"):
        cond_entries([[embeddings["a"], {"mask": "x"}]], schedule, "negative")
    with pytest.raises(
        ConditioningError, match="positive: conditioning option 'control' must be a ControlNet"
    ):
        cond_entries([[embeddings["a"], {"control": object()}]], schedule, "positive")
    with pytest.raises(ConditioningError, match=r"positive: conditioning option 'gligen' must be \(kind"):
        cond_entries([[embeddings["a"], {"gligen": object()}]], schedule, "positive")
    (two_masks,) = ConditioningSetMask().run(
        CTX, [[embeddings["a"], {}]], torch.ones(2, 8, 8), 1.0, "default"
    )
    with pytest.raises(
        ConditioningError,
        match="positive: a conditioning mask batch of 2 does not divide the latent batch of 3",
    ):
        denoiser(unet, two_masks, [[embeddings["neg"], {}]], 1.0)(x.repeat(3, 1, 1, 1), SIGMA.repeat(3))
    (outside,) = ConditioningSetArea().run(CTX, [[embeddings["a"], {}]], 64, 64, 512, 0, 1.0)
    with pytest.raises(
        ConditioningError, match="positive: conditioning area at x=512, y=0 .* outside the 256x128 image"
    ):
        denoiser(unet, outside, [[embeddings["neg"], {}]], 1.0)(x, SIGMA)


def test_bad_option_values_and_entries_name_what_is_wrong() -> None:
    import pytest as _pytest

    from nodes.conditioning_area import set_values
    from nodes.inpaint import grey_masked
    from nodes.sd.guidance import ConditioningError, cond_entries
    from nodes.sd.schedules import sd15_schedule

    cond = torch.zeros(1, 77, 768)
    with _pytest.raises(
        ConditioningError, match=r"negative: conditioning option 'strength' must be a number, got 'x'"
    ):
        cond_entries([[cond, {"strength": "x"}]], sd15_schedule(), "negative")
    with _pytest.raises(ConditioningError, match="start_percent"):
        cond_entries([[cond, {"start_percent": None}]], sd15_schedule(), "positive")
    assert (
        cond_entries([[cond, {"strength": torch.tensor(0.5)}]], sd15_schedule(), "positive")[0].strength
        == 0.5
    )
    assert set_values([[cond]], {"strength": 2.0})[0][1] == {"strength": 2.0}  # an entry without options
    with _pytest.raises(ValueError, match="conditioning: an entry is not"):
        set_values([["not a tensor", {}]], {"strength": 2.0})
    with _pytest.raises(ValueError, match="mask: 3 masks for 2 images"):
        grey_masked(torch.rand(2, 64, 64, 3), torch.rand(3, 64, 64))
