"""Parity: every oracle workflow, run through the real engine, lands inside ComfyUI's noise floor.

Each workflow in ../shared/oracle/workflows runs through validation and the executor with every
node nodegraph ships, on the oracle's generated checkpoint and LoRAs. The SaveLatent file, the
SaveImage PNG and the decoded float image (caught by a test-only output node before quantisation)
are laid out like refs/<workflow>/ and held to the oracle's gates with its own compare_refs.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from nodegraph.events import Event, ExecutionError
from nodegraph.validate import validate_prompt
from nodes.sd.latent_ops import load_latent_file
from tests.conftest import ORACLE, oracle_module

WORKFLOWS = sorted(p.stem for p in (ORACLE / "workflows").glob("*.json"))

# The oracle's suggested gates (README "Suggested gates")
LATENT_PSNR_MIN = 110.0
LATENT_REL_MAX = 3e-5
IMAGE_MAX_ABS = 3e-5
PNG_MAX_LEVELS = 1
PNG_FRACTION_MAX = 0.005


def _compare_refs() -> ModuleType:
    """The oracle's own compare_refs.py."""
    return oracle_module("compare_refs")


def run_workflow(
    engine: Any,
    name: str,
    out_dir: Path,
    captured: dict[str, np.ndarray],
    folder: str = "workflows",
    extra: dict[str, Any] | None = None,
) -> None:
    """Run one oracle workflow (from `folder`, plus `extra` nodes) and write image.png,
    image_float.npy and latent.npy into out_dir."""
    prompt = json.loads((ORACLE / folder / f"{name}.json").read_text())
    prompt["capture"] = {"class_type": "ParityCapture", "inputs": {"images": ["decode", 0]}}
    prompt |= extra or {}
    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    events: list[Event] = []
    outcome = engine.executor.execute(
        checked.prompt, f"parity-{name}", events.append, outputs=checked.outputs
    )
    errors = [e for e in events if isinstance(e, ExecutionError)]
    assert outcome.status == "success", errors or outcome
    out_dir.mkdir(parents=True)
    np.save(out_dir / "image_float.npy", captured["capture"])
    image = outcome.outputs["save_image"]["images"][0]
    output = engine.env.folders.output_dir
    shutil.copy(output / image["subfolder"] / image["filename"], out_dir / "image.png")
    latent = outcome.outputs["save_latent"]["latents"][0]
    np.save(
        out_dir / "latent.npy", load_latent_file(output / latent["subfolder"] / latent["filename"]).numpy()
    )


def test_every_oracle_workflow_is_tested() -> None:
    assert len(WORKFLOWS) >= 9 and "baseline" in WORKFLOWS


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_workflow_matches_comfyui(
    engine: Any, captured: dict[str, np.ndarray], workflow: str, tmp_path: Path
) -> None:
    run_workflow(engine, workflow, tmp_path / workflow, captured)
    result = _compare_refs().compare_dir(str(ORACLE / "refs" / workflow), str(tmp_path / workflow))
    print(workflow, {k: round(v, 9) if isinstance(v, float) else v for k, v in result.items()})
    for key in ("latent_psnr", "latent_max_rel", "image_max_abs", "png_max_abs_levels"):
        assert key in result, f"{key} missing from the comparison: {result}"
    assert result["latent_psnr"] >= LATENT_PSNR_MIN, result
    assert result["latent_max_rel"] <= LATENT_REL_MAX, result
    assert result["image_max_abs"] <= IMAGE_MAX_ABS, result
    assert result["png_max_abs_levels"] <= PNG_MAX_LEVELS, result
    assert result["png_frac_pixels_differ"] < PNG_FRACTION_MAX, result


@pytest.mark.parametrize("changed", ["strength_model", "both"])
def test_lora_workflow_after_a_strength_change_matches_comfyui(
    make_engine: Any, engine_base: Path, captured: dict[str, np.ndarray], tmp_path: Path, changed: str
) -> None:
    """The oracle LoRA workflow run right after another strength (its own engine, so nothing is
    cached): the UNet computes through runtime branches, and still lands inside the gates."""
    from nodes.loaders import model_store
    from nodes.sd.patcher import branched

    engine = make_engine()
    prompt = json.loads((ORACLE / "workflows" / "lora_single_a.json").read_text())
    before = json.loads(json.dumps(prompt))
    before["lora1"]["inputs"]["strength_model"] = 0.35
    if changed == "both":
        before["lora1"]["inputs"]["strength_clip"] = -0.6
    checked = validate_prompt(before, engine.registry, engine.env)
    outcome = engine.executor.execute(checked.prompt, "before", lambda e: None, outputs=checked.outputs)
    assert outcome.status == "success"
    unet = model_store(engine.env).checkpoint(engine_base / "models/checkpoints/mini_sd15.safetensors").unet
    assert branched(unet) == 0  # the first application is fused, as ComfyUI merges it
    run_workflow(engine, "lora_single_a", tmp_path / "after", captured)
    assert branched(unet) > 0  # the strength change ran through runtime branches
    result = _compare_refs().compare_dir(str(ORACLE / "refs" / "lora_single_a"), str(tmp_path / "after"))
    print(changed, {k: round(v, 9) if isinstance(v, float) else v for k, v in result.items()})
    assert result["latent_psnr"] >= LATENT_PSNR_MIN, result
    assert result["latent_max_rel"] <= LATENT_REL_MAX, result
    assert result["image_max_abs"] <= IMAGE_MAX_ABS, result
    assert result["png_max_abs_levels"] <= PNG_MAX_LEVELS, result


def test_strength_changes_never_reload_and_settle_to_a_fresh_application(
    make_engine: Any, engine_base: Path, latent_of: Any
) -> None:
    """Through the executor: a strength change reloads nothing and runs on branches; the next run
    with the same strengths (another seed) fuses them and gives a fresh engine's exact latent."""
    from nodes.loaders import model_store
    from nodes.sd.patcher import branched

    prompt = json.loads((ORACLE / "workflows" / "lora_single_a.json").read_text())

    def at(strength: float, seed: int) -> dict[str, Any]:
        p = json.loads(json.dumps(prompt))
        p["lora1"]["inputs"]["strength_model"] = strength
        p["ksampler"]["inputs"]["seed"] = seed
        return p

    engine = make_engine()
    store = model_store(engine.env)
    unet = store.checkpoint(engine_base / "models/checkpoints/mini_sd15.safetensors").unet
    latent_of(engine, at(0.35, 1), "first")
    latent_of(engine, at(-0.8, 1), "changed")
    assert branched(unet) > 0
    settled = latent_of(engine, at(-0.8, 2), "settled")
    assert branched(unet) == 0
    assert store.loads == 1  # the checkpoint was read once
    assert np.array_equal(settled, latent_of(make_engine(), at(-0.8, 2), "fresh"))
