"""FreeU_V2, PerturbedAttentionGuidance and RescaleCFG in a KSampler workflow on the mini checkpoint:
the patched MODEL samples differently, and the plain MODEL afterwards samples exactly as before
(the patches are data on the handle; the hooks live only for the patched run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.engine import Settings, build_engine
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.sd.latent_ops import load_latent_file


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Any:
    base = tmp_path_factory.mktemp("model_patches")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    return build_engine(Settings(base_directory=base, preview_method="none"), all_nodes())


def prompt(model: list[Any], extra: dict[str, Any], name: str) -> dict[str, Any]:
    return extra | {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": 42,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },  # fmt: skip
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": name}},
    }


def sampled(engine: Any, graph: dict[str, Any], name: str) -> torch.Tensor:
    checked = validate_prompt(graph, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    # a fresh executor: the plain run must really sample again, not come from the cache
    engine.executor.reset()
    outcome = engine.executor.execute(checked.prompt, name, lambda event: None, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    (entry,) = outcome.outputs["save"]["latents"]
    return load_latent_file(Path(engine.env.folders.output_dir) / entry["subfolder"] / entry["filename"])


def test_patched_model_samples_differently_and_leaves_the_plain_model_alone(engine: Any) -> None:
    before = sampled(engine, prompt(["ckpt", 0], {}, "plain"), "plain")
    patches = {
        "freeu": {
            "class_type": "FreeU_V2",
            "inputs": {"model": ["ckpt", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2},
        },
        "pag": {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["freeu", 0], "scale": 3.0}},
        "rescale": {"class_type": "RescaleCFG", "inputs": {"model": ["pag", 0], "multiplier": 0.7}},
    }
    patched = sampled(engine, prompt(["rescale", 0], patches, "patched"), "patched")
    after = sampled(engine, prompt(["ckpt", 0], {}, "plain_again"), "plain_again")
    assert torch.isfinite(patched).all()
    assert (patched - before).abs().max() > 1e-2
    assert torch.equal(after, before)
