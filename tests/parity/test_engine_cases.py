"""Further cases of the oracle's kinds, through the real engine, held to the refs they must reproduce.

* A batch of two: item 0 has the batch-1 noise and the same conditioning, so it must match
  refs/baseline within the parity gate.
* KSamplerAdvanced 0-3 with leftover noise, then 3-6 without adding noise, equals the 6-step run.
* img2img (LoadImage -> VAEEncode -> KSampler denoise 0.6 on an SDE sampler) runs end to end.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nodegraph.events import Event
from nodegraph.validate import validate_prompt
from nodes.sd.latent_ops import load_latent_file
from tests.conftest import ORACLE

BASELINE = json.loads((ORACLE / "workflows" / "baseline.json").read_text())
REF_LATENT = np.load(ORACLE / "refs" / "baseline" / "latent.npy")


def run(engine: Any, prompt: dict[str, Any], name: str) -> np.ndarray:
    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    events: list[Event] = []
    outcome = engine.executor.execute(checked.prompt, name, events.append, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    saved = outcome.outputs["save_latent"]["latents"][0]
    path = Path(engine.env.folders.output_dir) / saved["subfolder"] / saved["filename"]
    return load_latent_file(path).numpy()


def latent_psnr(ref: np.ndarray, got: np.ndarray) -> float:
    mse = float(np.mean((ref.astype(np.float64) - got) ** 2))
    return 10 * np.log10(float(ref.max() - ref.min()) ** 2 / mse) if mse else np.inf


def latent_only(prompt: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in prompt.items() if k not in ("decode", "save_image")}


def test_batch_item_zero_matches_the_batch_one_ref(engine: Any) -> None:
    prompt = latent_only(copy.deepcopy(BASELINE))
    prompt["latent"]["inputs"]["batch_size"] = 2
    prompt["save_latent"]["inputs"]["filename_prefix"] = "latents/batch2"
    got = run(engine, prompt, "batch2")
    assert got.shape[0] == 2
    assert latent_psnr(REF_LATENT[0], got[0]) >= 110.0
    assert latent_psnr(REF_LATENT[0], got[1]) < 40.0  # item 1 has its own noise


def test_advanced_split_matches_the_six_step_ref(engine: Any) -> None:
    prompt = latent_only(copy.deepcopy(BASELINE))
    common = {
        k: prompt["ksampler"]["inputs"][k] for k in ("model", "positive", "negative", "cfg", "sampler_name")
    }
    common |= {"steps": 6, "scheduler": "normal", "noise_seed": 42}
    prompt["first"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **common,
            "add_noise": "enable",
            "latent_image": ["latent", 0],
            "start_at_step": 0,
            "end_at_step": 3,
            "return_with_leftover_noise": "enable",
        },
    }
    prompt["ksampler"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **common,
            "add_noise": "disable",
            "latent_image": ["first", 0],
            "start_at_step": 3,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
        },
    }
    prompt["save_latent"]["inputs"]["filename_prefix"] = "latents/split"
    got = run(engine, prompt, "split")
    assert latent_psnr(REF_LATENT, got) >= 110.0


@pytest.mark.parametrize("sampler", ["dpmpp_sde", "uni_pc"])
def test_img2img_runs_end_to_end(engine: Any, sampler: str) -> None:
    prompt = latent_only(copy.deepcopy(BASELINE))
    prompt["image"] = {"class_type": "LoadImage", "inputs": {"image": "init_64.png"}}
    prompt["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2]}}
    prompt["ksampler"]["inputs"] |= {
        "latent_image": ["encode", 0],
        "denoise": 0.6,
        "sampler_name": sampler,
        "scheduler": "karras",
    }
    prompt["save_latent"]["inputs"]["filename_prefix"] = f"latents/img2img_{sampler}"
    prompt["peek"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["encode", 0], "filename_prefix": "x"},
    }
    got = run(engine, prompt, f"img2img-{sampler}")
    assert got.shape == (1, 4, 8, 8) and np.isfinite(got).all()
    assert latent_psnr(REF_LATENT[0], got[0]) < 40.0  # not the txt2img result
