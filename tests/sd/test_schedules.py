"""Schedules: the SD1.5 sigma table, the nine schedulers, denoise tails and KSamplerAdvanced windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nodes.sd import schedules as S
from tests.conftest import ORACLE

REFS = ORACLE / "refs"


@pytest.fixture(scope="module")
def ms() -> S.DiscreteSchedule:
    return S.sd15_schedule()


def test_sd15_table_matches_float64_formula(ms: S.DiscreteSchedule) -> None:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    expected = np.sqrt((1 - acp) / acp).astype(np.float32)
    assert np.array_equal(ms.sigmas.numpy(), expected)
    assert float(ms.sigma_min) == pytest.approx(0.029167159, rel=1e-6)
    assert float(ms.sigma_max) == pytest.approx(14.614641, rel=1e-6)


def test_timestep_is_nearest_integer_index(ms: S.DiscreteSchedule) -> None:
    assert int(ms.timestep(ms.sigma_max)) == 999
    assert int(ms.timestep(ms.sigma_min)) == 0
    # a sigma between two table entries maps to the nearer one in log space
    mid = torch.sqrt(ms.sigmas[500] * ms.sigmas[501]) * 0.999
    assert int(ms.timestep(mid)) == 500


@pytest.mark.parametrize(("workflow", "scheduler"), [("baseline", "normal"), ("sched_karras", "karras")])
def test_scheduler_equals_comfyui_bits(ms: S.DiscreteSchedule, workflow: str, scheduler: str) -> None:
    ref = np.load(REFS / workflow / "sigmas.npy")
    assert np.array_equal(S.sampler_sigmas(ms, scheduler, 6).numpy(), ref)


@pytest.mark.parametrize("name", S.SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 6, 20])
def test_every_scheduler_descends_to_zero(ms: S.DiscreteSchedule, name: str, steps: int) -> None:
    sigmas = S.calculate_sigmas(ms, name, steps)
    assert sigmas.dtype == torch.float32
    assert float(sigmas[-1]) == 0.0
    assert bool((sigmas[:-1] - sigmas[1:] >= 0).all())
    if name not in ("ddim_uniform", "beta"):
        assert len(sigmas) == steps + 1


def test_karras_matches_formula(ms: S.DiscreteSchedule) -> None:
    lo, hi, n = float(ms.sigma_min), float(ms.sigma_max), 10
    ramp = np.linspace(0, 1, n)
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    assert np.allclose(S.calculate_sigmas(ms, "karras", n).numpy()[:-1], expected, rtol=2e-6)


def test_exponential_is_geometric(ms: S.DiscreteSchedule) -> None:
    expected = np.geomspace(float(ms.sigma_max), float(ms.sigma_min), 8)
    assert np.allclose(S.calculate_sigmas(ms, "exponential", 8).numpy()[:-1], expected, rtol=2e-6)


def test_kl_optimal_formula(ms: S.DiscreteSchedule) -> None:
    n = 5
    r = np.arange(n) / (n - 1)
    expected = np.tan(r * math.atan(float(ms.sigma_min)) + (1 - r) * math.atan(float(ms.sigma_max)))
    assert np.allclose(S.calculate_sigmas(ms, "kl_optimal", n).numpy()[:-1], expected, rtol=1e-5)


def test_simple_and_sgm_uniform_pick_table_entries(ms: S.DiscreteSchedule) -> None:
    simple = S.calculate_sigmas(ms, "simple", 4).numpy()
    table = ms.sigmas.numpy()
    assert list(simple[:-1]) == [table[999], table[749], table[499], table[249]]
    sgm = S.calculate_sigmas(ms, "sgm_uniform", 4).numpy()
    # sgm_uniform samples timesteps 999, 749.25, 499.5, 249.75: log-sigma interpolation between entries
    assert sgm[0] == pytest.approx(table[999])
    assert sgm[2] == pytest.approx(math.sqrt(table[499] * table[500]), rel=1e-6)


def test_ddim_uniform_quirk_gives_one_extra_step(ms: S.DiscreteSchedule) -> None:
    sigmas = S.calculate_sigmas(ms, "ddim_uniform", 6)
    assert len(sigmas) == 8  # 7 steps for 6 requested, as ComfyUI does
    assert float(sigmas[0]) == pytest.approx(14.4386, abs=1e-4)


def test_linear_quadratic_starts_at_sigma_max(ms: S.DiscreteSchedule) -> None:
    sigmas = S.calculate_sigmas(ms, "linear_quadratic", 6)
    assert float(sigmas[0]) == pytest.approx(float(ms.sigma_max))


def test_discard_penultimate(ms: S.DiscreteSchedule) -> None:
    longer = S.calculate_sigmas(ms, "normal", 7)
    dropped = S.sampler_sigmas(ms, "normal", 6, discard_penultimate=True)
    assert len(dropped) == 7
    assert torch.equal(dropped, torch.cat([longer[:-2], longer[-1:]]))


def test_denoise_keeps_the_tail_of_a_longer_schedule(ms: S.DiscreteSchedule) -> None:
    tail = S.sampler_sigmas(ms, "karras", 6, denoise=0.5)
    assert torch.equal(tail, S.calculate_sigmas(ms, "karras", 12)[-7:])
    assert torch.equal(
        S.sampler_sigmas(ms, "normal", 6, denoise=0.99995), S.calculate_sigmas(ms, "normal", 6)
    )
    assert len(S.sampler_sigmas(ms, "normal", 6, denoise=0.0)) == 0


def test_split_window_and_force_full_denoise(ms: S.DiscreteSchedule) -> None:
    sigmas = S.calculate_sigmas(ms, "normal", 6)
    head = S.split_sigmas(sigmas, 0, 3, force_full_denoise=False)
    assert head is not None and torch.equal(head, sigmas[:4])
    forced = S.split_sigmas(sigmas, 0, 3, force_full_denoise=True)
    assert forced is not None and float(forced[-1]) == 0.0 and float(sigmas[3]) != 0.0
    tail = S.split_sigmas(sigmas, 3, 10000, force_full_denoise=True)
    assert tail is not None and torch.equal(tail, sigmas[3:])
    assert S.split_sigmas(sigmas, 6, 10000, force_full_denoise=True) is None


def test_unknown_scheduler_names_the_choices(ms: S.DiscreteSchedule) -> None:
    with pytest.raises(ValueError, match="karras"):
        S.calculate_sigmas(ms, "nope", 6)
