"""ModelSamplingContinuousEDM against its definition (Karras et al. 2022 and ComfyUI's
ModelSamplingContinuousEDM): a log-spaced sigma table, the timestep `0.25·ln σ`, the input scaled by
`1/√(σ²+σ_data²)` and the eps / v / EDM preconditioning of the output. References are written here
in float64 from the formulas, not from `nodes.sd.model_sampling`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes import sigmas as sn
from nodes.model_advanced import ModelSamplingContinuousEDM, ModelSamplingDiscrete
from nodes.sd.cond_entries import percent_to_sigma
from nodes.sd.handles import ModelHandle
from nodes.sd.model_sampling import EPS
from tests.nodes.tiny_unet import ksampler


def edm(model: ModelHandle, sampling: str, sigma_max: float = 120.0, sigma_min: float = 0.002) -> ModelHandle:
    (out,) = ModelSamplingContinuousEDM().run(None, model, sampling, sigma_max, sigma_min)  # type: ignore[arg-type]
    return out


def test_the_schedule_is_log_spaced_and_the_timestep_is_a_quarter_log_sigma(model: ModelHandle) -> None:
    table = edm(model, "v_prediction").sampling.schedule
    want = np.exp(np.linspace(math.log(0.002), math.log(120.0), 1000))
    np.testing.assert_allclose(table.sigmas.numpy(), want, rtol=2e-6)
    assert float(table.sigma_min) == pytest.approx(0.002, rel=1e-6)
    assert float(table.sigma_max) == pytest.approx(120.0, rel=1e-6)
    sigma = torch.tensor([0.5, 14.6])
    assert torch.allclose(table.timestep(sigma), 0.25 * torch.log(sigma))
    assert torch.allclose(table.sigma(table.timestep(sigma)), sigma)
    # percent_to_sigma: log-linear from sigma_max (0 %) to sigma_min (100 %)
    assert percent_to_sigma(table, 0.5) == pytest.approx(math.sqrt(120.0 * 0.002), rel=1e-5)
    assert percent_to_sigma(table, 0.25) == pytest.approx(120.0**0.75 * 0.002**0.25, rel=1e-5)
    assert percent_to_sigma(table, 0.0) > 1e8 and percent_to_sigma(table, 1.0) == 0.0


def test_input_scaling_and_denoised_formulas(model: ModelHandle) -> None:
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    sigma = torch.tensor([0.5, 7.0])
    s = sigma.double().reshape(2, 1, 1, 1)
    xd, od = x.double(), out.double()
    for sampling, sd in (("eps", 1.0), ("v_prediction", 1.0), ("edm", 0.5)):
        ms = edm(model, sampling).sampling
        assert ms.sigma_data == sd
        c_in = 1 / torch.sqrt(s**2 + sd**2)
        assert torch.allclose(ms.scale_input(sigma, x).double(), xd * c_in, atol=1e-6)
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / torch.sqrt(s**2 + sd**2)
        want = {"eps": xd - s * od, "v_prediction": c_skip * xd - c_out * od, "edm": c_skip * xd + c_out * od}
        assert torch.allclose(ms.denoised(sigma, out, x).double(), want[sampling], atol=1e-5), sampling


def test_schedulers_on_the_continuous_table(model: ModelHandle) -> None:
    ctx = RecordingContext(None)  # type: ignore[arg-type]
    edm_model = edm(model, "edm", 80.0, 0.002)
    (normal,) = sn.BasicScheduler().run(ctx, edm_model, "normal", 4, 1.0)
    want = np.exp(np.linspace(math.log(80.0), math.log(0.002), 4))  # equal steps of 0.25·ln σ
    np.testing.assert_allclose(normal.numpy(), [*want, 0.0], rtol=1e-5)
    (karras,) = sn.BasicScheduler().run(ctx, edm_model, "karras", 5, 1.0)
    assert float(karras[0]) == pytest.approx(80.0, rel=1e-5) and float(karras[-2]) == pytest.approx(
        0.002, rel=1e-5
    )


def test_the_unet_sees_the_scaled_input_and_the_log_sigma_timestep(
    env: Environment, model: ModelHandle
) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args[0].detach().clone(), torch.as_tensor(args[1]).detach().clone()))

    edm_model = edm(model, "edm", 80.0, 0.002)
    hook = model.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = ksampler(env, edm_model, steps=1, cfg=1.0, sampler_name="euler", scheduler="karras")
    finally:
        hook.remove()
    assert torch.isfinite(out).all()
    x_in, t = seen[0]
    assert torch.allclose(t, torch.full_like(t, 0.25 * math.log(80.0)), atol=1e-5)
    # the first x is the noise at sigma_max (max_denoise: noise·√(1+σ²)), scaled by 1/√(σ²+σ_data²)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    want = noise * math.sqrt(1 + 80.0**2) / math.sqrt(80.0**2 + 0.25)
    assert torch.allclose(x_in, want, rtol=1e-4, atol=1e-5)
    discrete = ksampler(env, model, steps=1, cfg=1.0, sampler_name="euler", scheduler="karras")
    assert not torch.allclose(out, discrete)


def test_discrete_sampling_replaces_it_and_bad_choices_are_refused(
    env: Environment, model: ModelHandle
) -> None:
    (back,) = ModelSamplingDiscrete().run(None, edm(model, "eps"), "eps", False)  # type: ignore[arg-type]
    assert back.sampling == EPS
    for sampling, words in (("cosmos_rflow", "Cosmos"),):
        problem = ModelSamplingContinuousEDM.check_inputs(
            env, sampling=sampling, sigma_max=120.0, sigma_min=0.002
        )
        assert problem is not None and words in problem
        with pytest.raises(ValueError, match=words):
            edm(model, sampling)
    problem = ModelSamplingContinuousEDM.check_inputs(env, sampling="edm", sigma_max=1.0, sigma_min=2.0)
    assert problem is not None and "sigma_min" in problem
    info = ModelSamplingContinuousEDM.info(None)
    assert info["input"]["required"]["sigma_max"] == [
        "FLOAT",
        {"default": 120.0, "min": 0.0, "max": 1000.0, "step": 0.001, "round": False},
    ]


def test_a_saved_continuous_v_prediction_model_declares_its_schedule(
    tmp_path: Any, model: ModelHandle
) -> None:
    from safetensors.torch import save_file

    from nodes.model_save import sampling_markers
    from nodes.sd.model_sampling import checkpoint_sampling

    markers = sampling_markers(edm(model, "v_prediction", 80.0, 0.03))
    assert sorted(markers) == ["edm_vpred.sigma_max", "edm_vpred.sigma_min"]  # no discrete v_pred marker
    path = tmp_path / "saved.safetensors"
    save_file(markers | {"model.diffusion_model.x": torch.ones(1)}, str(path))
    again = checkpoint_sampling(path)
    assert again.prediction == "v_prediction" and again.sigma_data == 1.0
    assert again.sigma_range == (pytest.approx(0.03, rel=1e-6), pytest.approx(80.0, rel=1e-6))
    # ComfyUI's EDM class derives from V_PREDICTION, so an edm-sampled model declares its schedule too
    assert sorted(sampling_markers(edm(model, "edm"))) == ["edm_vpred.sigma_max", "edm_vpred.sigma_min"]
    assert sampling_markers(edm(model, "eps")) == {}


PG_MEAN = torch.tensor([-1.6574, 1.886, -1.383, 2.5155], dtype=torch.float64).view(1, 4, 1, 1)
PG_STD = torch.tensor([8.4927, 5.9022, 6.5498, 5.2299], dtype=torch.float64).view(1, 4, 1, 1)


def test_playground_is_edm_in_its_own_latent_space(env: Environment, model: ModelHandle) -> None:
    """edm_playground_v2.5: edm with sigma_data 0.5, and the latent goes in as (x - mean)·0.5/std per
    channel and comes out as x·std/0.5 + mean (comfy.latent_formats.SDXL_Playground_2_5)."""
    assert (
        ModelSamplingContinuousEDM.check_inputs(
            env, sampling="edm_playground_v2.5", sigma_max=80.0, sigma_min=0.002
        )
        is None
    )
    pg = edm(model, "edm_playground_v2.5", 80.0, 0.002)
    plain = edm(model, "edm", 80.0, 0.002)
    assert pg.sampling.prediction == "edm" and pg.sampling.sigma_data == 0.5
    assert pg.sampling.schedule is plain.sampling.schedule and pg.unet is model.unet
    fmt = pg.sampling.latent_format
    assert fmt is not None
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        fmt.process_in(x).double(), (x.double() - PG_MEAN) * 0.5 / PG_STD, rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(fmt.process_out(fmt.process_in(x)), x, rtol=1e-6, atol=1e-6)
    # From an empty latent (left at zero, as ComfyUI leaves it) the model-space run is plain edm's;
    # only the way out differs: SD1.x's x/0.18215 there, Playground's x·std/0.5 + mean here.
    got = ksampler(env, pg, steps=2, cfg=1.0, sampler_name="euler", scheduler="karras")
    base = ksampler(env, plain, steps=2, cfg=1.0, sampler_name="euler", scheduler="karras")
    want = (base.double() * 0.18215) * PG_STD / 0.5 + PG_MEAN
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # ComfyUI keeps the latent format as a patch of its own: a later sampling node keeps it
    (discrete,) = ModelSamplingDiscrete().run(None, pg, "eps", False)  # type: ignore[arg-type]
    assert discrete.sampling.latent_format is fmt
    assert edm(pg, "v_prediction").sampling.latent_format is fmt
