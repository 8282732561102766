"""ModelSamplingDiscrete (eps, v_prediction, lcm, x0; zsnr) and checkpoint markers, against independent math.

The references are written here from the definitions (numpy float64 for the schedules; the VP form
x0 = α·z − σ_vp·v for v-prediction), not from `nodes.sd.model_sampling`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from nodes.model_advanced import ModelSamplingDiscrete
from nodes.sd.handles import ModelHandle
from nodes.sd.model_sampling import (
    EPS,
    PLAYGROUND_2_5,
    ModelSampling,
    checkpoint_sampling,
    discrete_schedule,
    from_checkpoint_keys,
)
from nodes.sd.schedules import sd15_schedule


def _np_sigmas(zsnr: bool) -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    if zsnr:  # Lin et al. 2023, algorithm 1, on √ᾱ; ComfyUI floors the last ᾱ at 4.8973451890853435e-08
        root = np.sqrt(abar)
        root = (root - root[-1]) * root[0] / (root[0] - root[-1])
        abar = root**2
        abar[-1] = 4.8973451890853435e-08
    return np.sqrt((1 - abar) / abar)


@pytest.mark.parametrize("zsnr", [False, True])
def test_schedules_match_the_definition(zsnr: bool) -> None:
    table = discrete_schedule("v_prediction", zsnr)
    want = _np_sigmas(zsnr)
    assert np.array_equal(table.sigmas.numpy(), want.astype(np.float32))
    assert np.array_equal(table.log_sigmas.numpy(), np.log(want).astype(np.float32))
    if zsnr:
        assert float(table.sigma_max) == pytest.approx(4518.76, rel=1e-5)
        assert float(table.sigma_min) == pytest.approx(0.0292, abs=1e-4)  # the first level is kept
    else:
        assert discrete_schedule("eps") is sd15_schedule()  # eps keeps the very table SD1.x always used


def test_lcm_uses_the_50_distilled_levels_and_their_timesteps() -> None:
    table = discrete_schedule("lcm")
    full = _np_sigmas(False).astype(np.float32)
    want = full[[999 - 20 * (49 - i) for i in range(50)]]  # every 20th level, ending at the last
    assert np.array_equal(table.sigmas.numpy(), want)
    # Level i stands for training timestep 20·i + 19, and back.
    t = table.timestep(torch.tensor(want[[0, 7, 49]]))
    assert t.tolist() == [19, 159, 999]
    assert torch.allclose(table.sigma(torch.tensor([19.0, 999.0])), torch.tensor(want[[0, 49]]))


def test_denoised_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    sigma = torch.tensor([0.5, 7.0])
    s = sigma.view(2, 1, 1, 1)
    assert torch.equal(EPS.denoised(sigma, out, x), x - out * s)
    assert torch.equal(ModelSampling("x0").denoised(sigma, out, x), out)
    # v-prediction in VP form: z = x/√(σ²+1), α = 1/√(σ²+1), σ_vp = σ/√(σ²+1), x0 = α·z − σ_vp·v.
    alpha, sigma_vp = 1 / (s**2 + 1).sqrt(), s / (s**2 + 1).sqrt()
    got = ModelSampling("v_prediction").denoised(sigma, out, x)
    assert torch.allclose(got, alpha * (x * alpha) - sigma_vp * out, atol=1e-6)
    # LCM: consistency-model boundary condition with σ_data 0.5 at τ = 10·timestep (distilled index).
    lcm = ModelSampling("lcm")
    tau = lcm.schedule.timestep(sigma).float().view(2, 1, 1, 1) * 10
    want = (tau / (tau**2 + 0.25).sqrt()) * (x - out * s) + (0.25 / (tau**2 + 0.25)) * x
    assert torch.allclose(lcm.denoised(sigma, out, x), want, atol=1e-6)
    with pytest.raises(ValueError, match="unknown sampling 'flow'"):
        ModelSampling("flow")


def test_checkpoint_markers() -> None:
    assert from_checkpoint_keys({"model.diffusion_model.out.2.weight"}) == EPS
    assert from_checkpoint_keys({"v_pred", "x"}) == ModelSampling("v_prediction", False)
    assert from_checkpoint_keys({"v_pred", "ztsnr"}) == ModelSampling("v_prediction", True)
    # Playground v2.5: edm, sigma_data 0.5, sigmas 0.002..80, its latent format; checked first
    playground = ModelSampling("edm", False, (0.002, 80.0), 0.5, PLAYGROUND_2_5)
    assert from_checkpoint_keys({"edm_mean", "edm_std"}) == playground
    assert from_checkpoint_keys({"edm_mean", "edm_std", "v_pred"}) == playground
    assert from_checkpoint_keys({"edm_mean"}) == EPS


def test_checkpoint_file_markers_are_read_from_the_header(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    def write(name: str, keys: list[str]) -> Any:
        path = tmp_path / name
        save_file({k: torch.tensor([]) for k in keys} | {"model.diffusion_model.x": torch.ones(1)}, str(path))
        return path

    assert checkpoint_sampling(write("plain.safetensors", [])) == EPS
    assert checkpoint_sampling(write("noob.safetensors", ["v_pred", "ztsnr"])) == ModelSampling(
        "v_prediction", True
    )
    pg = checkpoint_sampling(write("pg.safetensors", ["edm_mean", "edm_std", "edm_vpred.sigma_max"]))
    assert pg.prediction == "edm" and pg.latent_format == PLAYGROUND_2_5 and pg.sigma_range == (0.002, 80.0)
    assert checkpoint_sampling(tmp_path) == EPS  # a diffusers folder declares nothing
    # CosXL: v-prediction on the continuous EDM schedule its markers give (sigma_min 0.002 if absent)
    cosxl = tmp_path / "cosxl.safetensors"
    save_file(
        {"edm_vpred.sigma_max": torch.tensor([120.0]), "model.diffusion_model.x": torch.ones(1)}, str(cosxl)
    )
    assert checkpoint_sampling(cosxl) == ModelSampling("v_prediction", False, (0.002, 120.0), 1.0)
    save_file(
        {"edm_vpred.sigma_max": torch.tensor(80.0), "edm_vpred.sigma_min": torch.tensor(0.03)}, str(cosxl)
    )
    got = checkpoint_sampling(cosxl)
    assert got.sigma_range == (pytest.approx(0.03), 80.0) and got.schedule.sigma_max == pytest.approx(80.0)


def test_node_sets_the_sampling_and_keeps_weights_and_loras(tmp_path: Any) -> None:
    info = ModelSamplingDiscrete.info(None)
    assert info["input"]["required"]["sampling"][0] == ["eps", "v_prediction", "lcm", "x0"]
    assert info["input"]["required"]["zsnr"] == ["BOOLEAN", {"default": False}]
    assert info["category"] == "advanced/model"
    unet = torch.nn.Linear(1, 1)
    handle = ModelHandle(unet, "m.safetensors", "sdxl")
    (out,) = ModelSamplingDiscrete().run(None, handle, "v_prediction", True)
    assert out.sampling == ModelSampling("v_prediction", True) and out.unet is unet and handle.sampling == EPS
