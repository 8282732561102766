"""Per-output cache keys on the real LoRA nodes and the mini SD1.5 checkpoint, through the executor.

A strength_model change re-runs the sampler chain and no text encoder; a strength_clip change
re-encodes the prompts (and the sampler that reads them) and nothing that did not depend on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodegraph.engine import Engine, Settings, build_engine
from nodegraph.validate import validate_prompt
from nodes import all_nodes

CKPT = "mini_sd15.safetensors"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_loras: Path) -> Engine:
    base = tmp_path_factory.mktemp("lora_keys")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "loras").mkdir(parents=True)
    (base / "models" / "checkpoints" / CKPT).symlink_to(mini_checkpoint)
    for lora in mini_loras.glob("*.safetensors"):
        (base / "models" / "loras" / lora.name).symlink_to(lora)
    return build_engine(Settings(base_directory=base, preview_method="none"), all_nodes())


def lora_prompt(strength_model: float = 1.0, strength_clip: float = 1.0, tags: str = "") -> dict[str, Any]:
    """checkpoint -> LoraLoader (or LoraTagLoader with `tags`) -> two prompts -> KSampler -> SaveLatent."""
    lora: dict[str, Any] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["ckpt", 0],
            "clip": ["ckpt", 1],
            "lora_name": "mini_lora_a.safetensors",
            "strength_model": strength_model,
            "strength_clip": strength_clip,
        },
    }
    if tags:
        lora = {
            "class_type": "LoraTagLoader",
            "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "text": tags},
        }
    pos_text: Any = ["lora", 2] if tags else "a cat on a red chair"
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "lora": lora,
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["lora", 1], "text": pos_text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["lora", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["lora", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": 1,
                "steps": 1,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },  # fmt: skip
        "save": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["sampler", 0], "filename_prefix": "keys"},
        },
    }


def ran(engine: Engine, prompt: dict[str, Any]) -> list[str]:
    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok and checked.graph is not None, (checked.error, checked.node_errors)
    outcome = engine.executor.execute(checked.graph, "keys", lambda event: None)
    assert outcome.status == "success", outcome.error
    return sorted(outcome.executed)


def test_strength_model_change_reruns_the_sampler_chain_and_no_text_encoder(engine: Engine) -> None:
    ran(engine, lora_prompt(0.9, 0.7))
    assert ran(engine, lora_prompt(0.5, 0.7)) == ["lora", "sampler", "save"]


def test_strength_clip_change_reencodes_the_prompts_only(engine: Engine) -> None:
    ran(engine, lora_prompt(0.8, 0.6))
    # the sampler reads the new prompts; the checkpoint, the latent and nothing else re-run
    assert ran(engine, lora_prompt(0.8, 0.3)) == ["lora", "neg", "pos", "sampler", "save"]


def test_lora_file_change_reruns_both_sides(engine: Engine) -> None:
    ran(engine, lora_prompt(0.4, 0.4))
    other = lora_prompt(0.4, 0.4)
    other["lora"]["inputs"]["lora_name"] = "mini_lora_b.safetensors"
    assert ran(engine, other) == ["lora", "neg", "pos", "sampler", "save"]


def test_tag_unet_weight_change_reencodes_no_prompt(engine: Engine) -> None:
    ran(engine, lora_prompt(tags="a cat <lora:mini_lora_a:te=0.5:unet=0.9>"))
    # the tag's UNet weight changes: the MODEL re-runs the sampler, CLIP and the cleaned text keep their keys
    assert ran(engine, lora_prompt(tags="a cat <lora:mini_lora_a:te=0.5:unet=0.3>")) == [
        "lora",
        "sampler",
        "save",
    ]
    # the prose changes: only the positive prompt re-encodes (and the sampler that reads it)
    assert ran(engine, lora_prompt(tags="a dog <lora:mini_lora_a:te=0.5:unet=0.3>")) == [
        "lora", "pos", "sampler", "save"
    ]  # fmt: skip
