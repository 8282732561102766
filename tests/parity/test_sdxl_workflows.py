"""Parity: every SDXL oracle workflow, run through the real engine, lands inside ComfyUI's noise floor.

Each workflow in ../shared/oracle/workflows-sdxl runs on the oracle's mini SDXL checkpoint and LoRA.
Besides the latent, the float image and the PNG (as for SD1.x), the conditioning the sampler got
(cond, pooled output) is caught by a test-only node, and the added conditioning `y` the UNet really
received is caught on its label embedding (`add_embedding`), and each is held to the oracle's gates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nodes.sd.adm import adm_inputs, encode_adm
from tests.parity.test_oracle_workflows import (
    IMAGE_MAX_ABS,
    LATENT_PSNR_MIN,
    LATENT_REL_MAX,
    ORACLE,
    PNG_FRACTION_MAX,
    PNG_MAX_LEVELS,
    _compare_refs,
    run_workflow,
)

WORKFLOWS = sorted(p.stem for p in (ORACLE / "workflows-sdxl").glob("*.json"))
REFS = ORACLE / "refs-sdxl"
COND_PSNR_MIN = 120.0  # README-sdxl "Suggested gates" (ComfyUI's own floor: 138 dB)
COND_REL_MAX = 3e-5


def _ref(workflow: str, name: str) -> np.ndarray:
    """A reference array, following `<file>_same_as` to the workflow that stores it."""
    import json

    path = REFS / workflow / f"{name}.npy"
    if not path.exists():
        meta = json.loads((REFS / workflow / "meta.json").read_text())
        path = REFS / meta[f"{name}_same_as"] / f"{name}.npy"
    return np.load(path)


def _gate(name: str, ref: np.ndarray, got: np.ndarray) -> None:
    assert ref.shape == got.shape, (name, ref.shape, got.shape)
    diff = np.abs(ref.astype(np.float64) - got)
    mse = float(np.mean(diff**2))
    peak = float(ref.max() - ref.min())
    psnr = math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
    rel = float(diff.max() / np.abs(ref).max())
    print(name, f"psnr {psnr:.1f} dB, rel {rel:.2e}")
    assert psnr >= COND_PSNR_MIN and rel <= COND_REL_MAX, (name, psnr, rel)


def test_every_sdxl_oracle_workflow_is_tested() -> None:
    assert {"sdxl_baseline", "sdxl_textencode_sdxl", "sdxl_lora"} <= set(WORKFLOWS)


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_sdxl_workflow_matches_comfyui(
    sdxl_engine: Any,
    sdxl_store: Any,
    mini_sdxl_checkpoint: Path,
    captured: dict[str, np.ndarray],
    captured_conds: dict[str, Any],
    workflow: str,
    tmp_path: Path,
) -> None:
    unet = sdxl_store.checkpoint(mini_sdxl_checkpoint).unet
    seen: list[torch.Tensor] = []
    hook = unet.add_embedding.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    extra = {
        f"cap_{side}": {"class_type": "SdxlCondCapture", "inputs": {"conditioning": [side, 0]}}
        for side in ("pos", "neg")
    }
    try:
        run_workflow(sdxl_engine, workflow, tmp_path / workflow, captured, "workflows-sdxl", extra)
    finally:
        hook.remove()
    result = _compare_refs().compare_dir(str(REFS / workflow), str(tmp_path / workflow))
    print(workflow, {k: round(v, 9) if isinstance(v, float) else v for k, v in result.items()})
    assert result["latent_psnr"] >= LATENT_PSNR_MIN, result
    assert result["latent_max_rel"] <= LATENT_REL_MAX, result
    assert result["image_max_abs"] <= IMAGE_MAX_ABS, result
    assert result["png_max_abs_levels"] <= PNG_MAX_LEVELS, result
    assert result["png_frac_pixels_differ"] < PNG_FRACTION_MAX, result
    latent = np.load(tmp_path / workflow / "latent.npy")
    height, width = latent.shape[2], latent.shape[3]
    for side, name in (("pos", "positive"), ("neg", "negative")):
        [(cond, options)] = captured_conds[f"cap_{side}"]
        _gate(f"cond_{side}", _ref(workflow, f"cond_{side}"), cond.numpy())
        _gate(f"pooled_{side}", _ref(workflow, f"pooled_{side}"), options["pooled_output"].numpy())
        adm = encode_adm(adm_inputs(options, width, height, name, 2816, name)).numpy()
        _gate(f"adm_{side}", _ref(workflow, f"adm_{side}"), adm)
        # What the UNet's label embedding actually received, on every step, for this side's row
        rows = torch.cat(seen).numpy()
        ref = _ref(workflow, f"adm_{side}")
        nearest = rows[np.argmin(np.abs(rows - ref).max(axis=1))]
        _gate(f"unet_y_{side}", ref, nearest[None])
