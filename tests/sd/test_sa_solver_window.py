"""SA-Solver adds noise only between the model's own percent_to_sigma(0.2) and (0.8), as ComfyUI's
sample_sa_solver reads them from the sampled model's `model_sampling`, not from SD1.5's table."""

from __future__ import annotations

import torch

from nodes.sd.cond_entries import percent_to_sigma
from nodes.sd.ksampler import _Inpaint
from nodes.sd.model_sampling import continuous_schedule
from nodes.sd.samplers import SAMPLERS
from nodes.sd.schedules import DiscreteSchedule, sd15_schedule


class _Denoiser:
    """A deterministic x0 prediction that depends on x, carrying a sigma table as CFGDenoiser does."""

    def __init__(self, schedule: DiscreteSchedule) -> None:
        self.schedule = schedule

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * 0.5 / (1.0 + sigma.reshape(-1, 1, 1, 1))


def _run(name: str, schedule: DiscreteSchedule, sigmas: torch.Tensor, seed: int) -> torch.Tensor:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    return SAMPLERS[name](_Denoiser(schedule), x, sigmas, seed, None)


def test_the_noise_window_is_the_sampled_models() -> None:
    sd15, edm = sd15_schedule(), continuous_schedule(0.002, 1.0)
    low, high = percent_to_sigma(sd15, 0.8), percent_to_sigma(sd15, 0.2)
    # sigmas inside SD1.5's window and above the whole of this EDM model's (about 0.29 .. 0.007)
    assert percent_to_sigma(edm, 0.2) < low
    sigmas = torch.cat([torch.linspace(high * 0.95, low * 1.05, 6), torch.zeros(1)])
    for name in ("sa_solver", "sa_solver_pece"):
        assert not torch.equal(_run(name, sd15, sigmas, 1), _run(name, sd15, sigmas, 2)), name
        # outside the EDM model's window the solver is deterministic: the seed changes nothing
        assert torch.equal(_run(name, edm, sigmas, 1), _run(name, edm, sigmas, 2)), name


def test_the_inpainting_wrapper_shows_the_models_table() -> None:
    inner = _Denoiser(continuous_schedule(0.002, 80.0))
    mask = torch.ones(1, 1, 8, 8)
    wrapped = _Inpaint(inner, mask, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))  # type: ignore[arg-type]
    assert wrapped.schedule is inner.schedule
