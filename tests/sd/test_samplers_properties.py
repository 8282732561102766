"""Every sampler against facts that do not come from ComfyUI's code.

1. With a constant denoised prediction c, the probability-flow ODE dx/dsigma = (x - c)/sigma has the
   exact solution x(sigma) = c + (x_T - c) * sigma / sigma_T; all first-order-exact solvers hit it,
   and every sampler (stochastic ones included) ends on c when the last sigma is 0.
2. LMS integrates a derivative that is linear in sigma exactly once it has two history points.
3. The Brownian tree is additive over adjacent intervals and deterministic in the seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodes.sd.noise import BrownianTreeNoiseSampler, default_noise_sampler, prepare_noise
from nodes.sd.samplers import DISCARD_PENULTIMATE, SAMPLER_NAMES, SAMPLERS
from nodes.sd.samplers.deis import deis_coefficients
from nodes.sd.samplers.k_diffusion import lms_coefficient
from nodes.sd.samplers.sa_solver import _b_coeffs
from nodes.sd.schedules import sampler_sigmas, sd15_schedule

ODE_EXACT = (
    "euler",
    "euler_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "ipndm",
    "res_multistep",
    "res_multistep_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "ddim",
)
COMFY_ORDER = (
    "euler euler_cfg_pp euler_ancestral euler_ancestral_cfg_pp heun heunpp2 dpm_2 dpm_2_ancestral lms "
    "dpm_fast dpm_adaptive dpmpp_2s_ancestral dpmpp_2s_ancestral_cfg_pp dpmpp_sde dpmpp_sde_gpu dpmpp_2m "
    "dpmpp_2m_cfg_pp dpmpp_2m_sde dpmpp_2m_sde_gpu dpmpp_2m_sde_heun dpmpp_2m_sde_heun_gpu dpmpp_3m_sde "
    "dpmpp_3m_sde_gpu ddpm lcm ipndm ipndm_v deis res_multistep res_multistep_cfg_pp res_multistep_ancestral "
    "res_multistep_ancestral_cfg_pp gradient_estimation gradient_estimation_cfg_pp er_sde seeds_2 seeds_3 "
    "sa_solver sa_solver_pece ddim uni_pc uni_pc_bh2"
).split()
REQUIRED = (
    "euler euler_ancestral heun dpm_2 dpm_2_ancestral lms dpmpp_2s_ancestral dpmpp_sde dpmpp_2m "
    "dpmpp_2m_sde dpmpp_3m_sde ddim uni_pc uni_pc_bh2 lcm ddpm"
).split()


def test_offered_samplers_are_comfyui_list_in_its_order() -> None:
    assert set(REQUIRED) <= set(SAMPLER_NAMES)
    assert list(SAMPLER_NAMES) == COMFY_ORDER


# ipndm_v is left out on purpose: ComfyUI's order-4 variable-step weights (from diff-solvers) do not
# sum to one on uneven steps, so it is not exact even for a constant derivative; we keep its weights.


class Constant:
    """A denoiser whose prediction (conditional and unconditional alike) is always c."""

    def __init__(self, c: torch.Tensor) -> None:
        self.uncond_denoised = c

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.uncond_denoised


def _sigmas(name: str, steps: int = 8) -> torch.Tensor:
    return sampler_sigmas(sd15_schedule(), "karras", steps, discard_penultimate=name in DISCARD_PENULTIMATE)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_constant_prediction_ends_on_it(name: str) -> None:
    torch.manual_seed(0)
    c = torch.randn(1, 4, 8, 8)
    sigmas = _sigmas(name)
    x_t = c + torch.randn(1, 4, 8, 8) * torch.sqrt(1 + sigmas[0] ** 2)
    steps: list[int] = []
    out = SAMPLERS[name](Constant(c), x_t, sigmas, 7, lambda i, d, x: steps.append(i))
    end = c
    if name.startswith("uni_pc"):  # UniPC stops at sigma 0.001 (its lambda is infinite at 0)
        end = c + (x_t - c) / torch.sqrt(1 + sigmas[0] ** 2) * 0.001
    if name in ("dpm_fast", "dpm_adaptive"):  # DPM-Solver stops at the last positive sigma
        end = c + (x_t - c) * sigmas[-2] / sigmas[0]
    assert torch.allclose(out, end, atol=2e-4), float((out - end).abs().max())
    if name != "dpm_adaptive":  # the adaptive solver reports the steps it chose
        assert steps == list(range(len(steps))) and 0 < len(steps) <= len(sigmas) - 1
    if name not in ("dpm_fast", "dpm_adaptive"):
        assert len(steps) == len(sigmas) - 1


@pytest.mark.parametrize("name", ODE_EXACT)
def test_ode_solvers_follow_the_exact_solution(name: str) -> None:
    torch.manual_seed(1)
    c = torch.randn(1, 4, 8, 8).double()
    sigmas = _sigmas(name).double()
    x_t = c + torch.randn(1, 4, 8, 8).double() * sigmas[0]
    xs: list[torch.Tensor] = []
    SAMPLERS[name](Constant(c), x_t, sigmas, 7, lambda i, d, x: xs.append(x))
    for i, x in enumerate(xs):
        exact = c + (x_t - c) * sigmas[i] / sigmas[0]
        assert torch.allclose(x, exact, rtol=1e-9, atol=1e-9), (i, float((x - exact).abs().max()))


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_follows_the_exact_solution_in_vp_space(name: str) -> None:
    """UniPC reports x_vp = x / sqrt(1 + sigma^2); its last step ends at sigma 0.001."""
    torch.manual_seed(2)
    c = torch.randn(1, 4, 8, 8).double()
    sigmas = _sigmas(name).double()
    x_t = c + torch.randn(1, 4, 8, 8).double() * torch.sqrt(1 + sigmas[0] ** 2)
    xs: list[torch.Tensor] = []
    out = SAMPLERS[name](lambda x, s: c, x_t, sigmas, 7, lambda i, d, x: xs.append(x))
    reached = list(sigmas[: len(xs) - 1]) + [torch.tensor(0.001, dtype=torch.float64)]
    for x, sigma in zip(xs, reached, strict=True):
        vp_std = sigma / torch.sqrt(1 + sigma**2)
        exact = c / torch.sqrt(1 + sigma**2) + vp_std * (
            x_t / torch.sqrt(1 + sigmas[0] ** 2) - c / torch.sqrt(1 + sigmas[0] ** 2)
        ) / (sigmas[0] / torch.sqrt(1 + sigmas[0] ** 2))
        assert torch.allclose(x, exact, atol=1e-9), float(sigma)
    assert torch.allclose(out, xs[-1] * torch.sqrt(torch.tensor(1 + 0.001**2, dtype=torch.float64)))


def test_lms_integrates_a_linear_derivative_exactly() -> None:
    sigmas = _sigmas("lms", 6).double()
    a, b = 0.3, -1.7
    xs: list[torch.Tensor] = []

    def model(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x - s[0] * (a + b * s[0])  # so that d = (x - D)/sigma = a + b*sigma

    SAMPLERS["lms"](
        model, torch.zeros(1, 1, 1, 1, dtype=torch.float64), sigmas, None, lambda i, d, x: xs.append(x)
    )
    for i in range(1, len(xs) - 1):
        s0, s1 = float(sigmas[i]), float(sigmas[i + 1])
        exact = a * (s1 - s0) + b * (s1**2 - s0**2) / 2
        assert float(xs[i + 1] - xs[i]) == pytest.approx(exact, rel=1e-4)


def test_lms_first_coefficient_is_the_step() -> None:
    t = [10.0, 4.0, 1.0]
    assert lms_coefficient(1, t, 0, 0) == pytest.approx(-6.0)
    # order-2 weights integrate 1 and tau exactly
    w0, w1 = lms_coefficient(2, t, 1, 0), lms_coefficient(2, t, 1, 1)
    assert w0 + w1 == pytest.approx(-3.0)
    assert w0 * 4.0 + w1 * 10.0 == pytest.approx((1.0 - 16.0) / 2)


def test_brownian_tree_is_additive_and_seeded() -> None:
    x = torch.zeros(1, 4, 8, 8)
    tree = BrownianTreeNoiseSampler(x, torch.tensor(0.03), torch.tensor(14.6), seed=5)
    a, b, c = torch.tensor(10.0), torch.tensor(4.0), torch.tensor(1.0)
    whole = tree(a, c) * (a - c).sqrt()
    parts = tree(a, b) * (a - b).sqrt() + tree(b, c) * (b - c).sqrt()
    assert torch.allclose(whole, parts, atol=1e-4)
    again = BrownianTreeNoiseSampler(x, torch.tensor(0.03), torch.tensor(14.6), seed=5)
    assert torch.equal(again(a, b), tree(a, b))
    other = BrownianTreeNoiseSampler(x, torch.tensor(0.03), torch.tensor(14.6), seed=6)
    assert not torch.equal(other(a, b), tree(a, b))
    assert float(tree(a, b).std()) == pytest.approx(1.0, abs=0.25)


def test_noise_is_one_cpu_draw_and_batch_index_reuses_draws() -> None:
    latent = torch.zeros(3, 4, 8, 8)
    full = prepare_noise(latent, 42)
    torch.manual_seed(42)
    assert torch.equal(full, torch.randn(3, 4, 8, 8))
    assert torch.equal(prepare_noise(torch.zeros(1, 4, 8, 8), 42), full[:1])
    picked = prepare_noise(torch.zeros(2, 4, 8, 8), 42, batch_index=[2, 0])
    assert torch.equal(picked[0], full[2]) and torch.equal(picked[1], full[0])


def test_ancestral_noise_generator_is_seeded_independently_of_the_global_one() -> None:
    x = torch.zeros(1, 4, 8, 8)
    first = default_noise_sampler(x, 42)(torch.tensor(1.0), torch.tensor(0.5))
    torch.manual_seed(999)
    second = default_noise_sampler(x, 42)(torch.tensor(1.0), torch.tensor(0.5))
    gen = torch.Generator().manual_seed(42)
    assert torch.equal(first, second) and torch.equal(first, torch.randn(1, 4, 8, 8, generator=gen))
    assert np.isfinite(first.numpy()).all()


def test_deis_weights_integrate_dsigma() -> None:
    """DEIS weights of one step sum to the step in sigma (the integrand is dsigma/dtau), up to quadrature."""
    sigmas = _sigmas("deis", 6)
    rows = deis_coefficients(sigmas)
    for i, row in enumerate(rows[:-1]):
        if row:
            assert float(sum(row)) == pytest.approx(float(sigmas[i + 1] - sigmas[i]), rel=2e-3)


@pytest.mark.parametrize("steps", [3, 8, 9])
def test_dpm_fast_spends_exactly_the_step_budget(steps: int) -> None:
    sigmas = _sigmas("dpm_fast", steps)
    calls: list[float] = []
    c = torch.zeros(1, 4, 8, 8)

    def model(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append(float(s[0]))
        return c

    SAMPLERS["dpm_fast"](model, torch.ones(1, 4, 8, 8) * sigmas[0], sigmas, None, None)
    assert len(calls) == steps
    assert calls[0] == pytest.approx(float(sigmas[0]), rel=1e-5)
    assert min(calls) >= float(sigmas[-2]) * (1 - 1e-5)  # never evaluated below the last positive sigma


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_sa_solver_weights_reproduce_a_constant_prediction(order: int, tau: float) -> None:
    """Weights on a constant x0 must sum to 1 - exp(-(1 + tau^2) h): the exact exponential integral."""
    sigmas = _sigmas("sa_solver", 8).double()
    lambdas = sigmas[:-1].log().neg()
    i = 5
    b = _b_coeffs(sigmas[i + 1], lambdas[i - order + 1 : i + 1], lambdas[i], lambdas[i + 1], tau)
    h = lambdas[i + 1] - lambdas[i]
    assert float(b.sum()) == pytest.approx(float(-torch.expm1(-(1 + tau**2) * h)), rel=1e-8)
