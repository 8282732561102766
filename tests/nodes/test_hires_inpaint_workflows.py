"""End to end through the real executor on the mini checkpoint: a hires-fix and an inpaint workflow.

Hires fix: EmptyLatentImage -> KSampler -> LatentUpscaleBy -> KSampler (denoise 0.5) -> VAEDecode ->
SaveImage.
Inpaint: LoadImage + LoadImageMask -> VAEEncodeForInpaint -> KSampler -> VAEDecode -> SaveImage; the
latent outside the (grown) mask must come back unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.engine import Settings, build_engine
from nodegraph.events import Event
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.sd.latent_ops import load_latent_file
from tests.conftest import ORACLE


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Any:
    base = tmp_path_factory.mktemp("hires_inpaint")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    (base / "input").mkdir()
    shutil.copy(ORACLE / "workflows" / "init_64.png", base / "input" / "init_64.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(np.stack([mask, mask, mask], axis=-1), "RGB").save(base / "input" / "mask_64.png")
    return build_engine(Settings(base_directory=base, preview_method="none"), all_nodes())


def common() -> dict[str, Any]:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
    }


def sampler(latent: list[Any], denoise: float, seed: int) -> dict[str, Any]:
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": ["ckpt", 0],
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": latent,
            "seed": seed,
            "steps": 2,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": denoise,
        },
    }


def execute(engine: Any, prompt: dict[str, Any], name: str) -> dict[str, Any]:
    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    events: list[Event] = []
    outcome = engine.executor.execute(checked.prompt, name, events.append, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    return dict(outcome.outputs)


def saved_file(engine: Any, entry: dict[str, str]) -> Path:
    return Path(engine.env.folders.output_dir) / entry["subfolder"] / entry["filename"]


def test_hires_fix_workflow(engine: Any) -> None:
    prompt = common() | {
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "first": sampler(["latent", 0], 1.0, 1),
        "upscale": {
            "class_type": "LatentUpscaleBy",
            "inputs": {"samples": ["first", 0], "upscale_method": "nearest-exact", "scale_by": 1.5},
        },
        "second": sampler(["upscale", 0], 0.5, 2),
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["second", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "hires"}},
        "keep_upscaled": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["upscale", 0], "filename_prefix": "latents/hires_up"},
        },
        "keep_second": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["second", 0], "filename_prefix": "latents/hires_second"},
        },
    }
    outputs = execute(engine, prompt, "hires")
    (entry,) = outputs["save"]["images"]
    with Image.open(saved_file(engine, entry)) as image:
        assert image.size == (96, 96)
    (up_entry,) = outputs["keep_upscaled"]["latents"]
    (second_entry,) = outputs["keep_second"]["latents"]
    upscaled = load_latent_file(saved_file(engine, up_entry))
    second = load_latent_file(saved_file(engine, second_entry))
    assert upscaled.shape == second.shape == (1, 4, 12, 12)
    assert torch.isfinite(second).all()
    # the second pass (denoise 0.5) re-samples the upscaled latent rather than passing it through
    assert (second - upscaled).abs().mean() > 1e-3 * upscaled.abs().mean()


def test_inpaint_workflow_keeps_the_unmasked_latent(engine: Any) -> None:
    prompt = common() | {
        "image": {"class_type": "LoadImage", "inputs": {"image": "init_64.png"}},
        "mask": {"class_type": "LoadImageMask", "inputs": {"image": "mask_64.png", "channel": "red"}},
        "encode": {
            "class_type": "VAEEncodeForInpaint",
            "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2], "mask": ["mask", 0], "grow_mask_by": 6},
        },
        "sample": sampler(["encode", 0], 1.0, 3),
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {
            "class_type": "SaveImage",
            "inputs": {"images": ["decode", 0], "filename_prefix": "inpaint"},
        },
        "save_encoded": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["encode", 0], "filename_prefix": "latents/encoded"},
        },
        "save_sampled": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["sample", 0], "filename_prefix": "latents/sampled"},
        },
    }
    outputs = execute(engine, prompt, "inpaint")
    (entry,) = outputs["save"]["images"]
    with Image.open(saved_file(engine, entry)) as image:
        assert image.size == (64, 64)
    encoded = load_latent_file(saved_file(engine, outputs["save_encoded"]["latents"][0])).numpy()
    sampled = load_latent_file(saved_file(engine, outputs["save_sampled"]["latents"][0])).numpy()
    # the grown mask covers pixels 14..50; latent rows/columns 0, 1, 6 and 7 are wholly outside it
    outside = np.ones((8, 8), dtype=bool)
    outside[2:6, 2:6] = False
    assert np.allclose(sampled[0][:, outside], encoded[0][:, outside], atol=1e-4)
    assert not np.allclose(sampled[0][:, 3:5, 3:5], encoded[0][:, 3:5, 3:5], atol=1e-2)


def test_timestep_ranges_switch_prompts_during_sampling(engine: Any) -> None:
    """Prompt A for the first half and prompt B for the second differs from A or B alone."""

    def run(positive: list[Any], name: str) -> np.ndarray:
        prompt = common() | {
            "other": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["ckpt", 1]}},
            "early": {
                "class_type": "ConditioningSetTimestepRange",
                "inputs": {"conditioning": ["pos", 0], "start": 0.0, "end": 0.5},
            },
            "late": {
                "class_type": "ConditioningSetTimestepRange",
                "inputs": {"conditioning": ["other", 0], "start": 0.5, "end": 1.0},
            },
            "both": {
                "class_type": "ConditioningCombine",
                "inputs": {"conditioning_1": ["early", 0], "conditioning_2": ["late", 0]},
            },
            "latent": {
                "class_type": "EmptyLatentImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1},
            },
            "sample": sampler(["latent", 0], 1.0, 4),
            "save": {
                "class_type": "SaveLatent",
                "inputs": {"samples": ["sample", 0], "filename_prefix": name},
            },
        }
        prompt["sample"]["inputs"] = prompt["sample"]["inputs"] | {"positive": positive, "steps": 4}
        outputs = execute(engine, prompt, name)
        return load_latent_file(saved_file(engine, outputs["save"]["latents"][0])).numpy()

    switched = run(["both", 0], "latents/switched")
    only_a, only_b = run(["pos", 0], "latents/only_a"), run(["other", 0], "latents/only_b")
    assert np.isfinite(switched).all()
    assert not np.allclose(switched, only_a, atol=1e-4) and not np.allclose(switched, only_b, atol=1e-4)
