"""CheckpointSave's SDXL layout (SGM): every tensor back under the names the oracle generator writes.

Small SDXL-structured modules are exported with `sgm_state_dict`; the oracle's own maps
(`unet_ldm_to_diffusers`, `clip_g_openclip_to_hf`: LDM/open_clip -> diffusers/transformers, with
q/k/v row slices and the transposed projection) read every tensor back, independently of the export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sdxl_lora_fixtures import SMALL_UNET, oracle_sdxl, small_models

from nodes.model_save import model_metadata
from nodes.model_save import sampling_markers as _sampling_markers
from nodes.sd.handles import ModelHandle
from nodes.sd.lora.ldm_export import SGM_CLIP_L, sgm_state_dict
from nodes.sd.model_sampling import ModelSampling


@pytest.fixture(scope="module")
def vae() -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    )


def _hf_from_openclip(oracle: Path, state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers bigG tensors rebuilt from open_clip keys with the oracle's map."""
    x = oracle_sdxl(oracle)
    # The oracle's map is written for embedders.1; the refiner's bigG sits at embedders.0.
    state = {x.CLIP_G_PREFIX + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    for key, targets in x.clip_g_openclip_to_hf().items():
        if key not in state:
            continue
        for name, rows, transpose in targets:
            t = state[key].t() if transpose else state[key]
            if rows:  # the oracle's slices are for bigG's width: take the same third of this one
                third, h = rows[0] // (rows[1] - rows[0]), t.shape[0] // 3
                t = t[third * h : (third + 1) * h]
            out[name] = t
    return out


@pytest.mark.parametrize("refiner", [False, True])
def test_sgm_layout_round_trips_through_the_oracle_maps(refiner: bool, oracle_dir: Path, vae: Any) -> None:
    unet, clip_l, clip_g = small_models(oracle_dir)
    state = sgm_state_dict(unet, None if refiner else clip_l, clip_g, vae)
    assert all(t.dtype == torch.float16 for t in state.values())
    ldm_to_dif = oracle_sdxl(oracle_dir).unet_ldm_to_diffusers(SMALL_UNET)
    unet_params = dict(unet.named_parameters())
    unet_keys = {k for k in state if k.startswith("model.diffusion_model.")}
    assert unet_keys == {"model.diffusion_model." + k for k in ldm_to_dif}
    for k, d in ldm_to_dif.items():
        assert torch.equal(state["model.diffusion_model." + k], unet_params[d].half()), k
    prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    g = _hf_from_openclip(oracle_dir, state, prefix)
    g_params = dict(clip_g.named_parameters())
    assert set(g) == set(g_params)
    assert all(torch.equal(g[n], p.half()) for n, p in g_params.items())
    assert state[prefix + "logit_scale"].float().item() == pytest.approx(4.6052, abs=1e-3)
    l_keys = {k for k in state if k.startswith(SGM_CLIP_L)}
    if refiner:
        assert not l_keys
    else:
        want = {SGM_CLIP_L + n: p.half() for n, p in clip_l.named_parameters()}
        assert l_keys == set(want) and all(torch.equal(state[k], v) for k, v in want.items())
    assert any(k.startswith("first_stage_model.decoder.") for k in state)


V_ZSNR, V = ModelSampling("v_prediction", True), ModelSampling("v_prediction")
EDM_V = ModelSampling("v_prediction", False, (0.002, 120.0))
EDM_KEYS = {"edm_vpred.sigma_max", "edm_vpred.sigma_min"}


@pytest.mark.parametrize(
    ("base", "current", "key", "markers"),
    [
        (ModelSampling(), ModelSampling(), "epsilon", set()),
        # ModelSamplingDiscrete(v_prediction, zsnr) on an eps file: ComfyUI's model type stays EPS
        (ModelSampling(), V_ZSNR, "epsilon", set()),
        (V_ZSNR, V_ZSNR, "v", {"v_pred", "ztsnr"}),  # NoobAI-XL v-pred as loaded
        (V, V, "v", {"v_pred"}),
        (V_ZSNR, ModelSampling(), "v", {"v_pred"}),  # zsnr is read from the sampling in use
        (V, ModelSampling("lcm", True), "v", {"v_pred", "ztsnr"}),
        (ModelSampling(), EDM_V, "epsilon", EDM_KEYS),  # ModelSamplingContinuousEDM v_prediction
        (ModelSampling(), ModelSampling("edm", False, (0.002, 80.0), 0.5), "epsilon", EDM_KEYS),
        (ModelSampling(), ModelSampling("eps", False, (0.002, 80.0)), "epsilon", set()),
        (EDM_V, EDM_V, None, EDM_KEYS),  # CosXL: V_PREDICTION_EDM has no predict key
        (EDM_V, V, None, set()),
    ],
)
def test_saved_markers_follow_comfyui_model_type(
    base: ModelSampling, current: ModelSampling, key: str | None, markers: set[str]
) -> None:
    """save_checkpoint: `v_pred` and the predict key from the loaded model type, `ztsnr` from the
    sampling in use, `edm_vpred.*` from a continuous v_prediction or edm (EDM derives V_PREDICTION)."""
    handle = ModelHandle(None, "x", "sdxl", sampling=current, base_sampling=base)
    got = _sampling_markers(handle)
    assert set(got) == markers
    assert model_metadata(handle, False, "t").get("modelspec.predict_key") == key
    if markers & EDM_KEYS:
        assert got["edm_vpred.sigma_min"].dtype == torch.float32 and got["edm_vpred.sigma_min"].dim() == 0
        assert float(got["edm_vpred.sigma_max"]) == pytest.approx(current.sigma_range[1], rel=1e-6)  # type: ignore[index]
