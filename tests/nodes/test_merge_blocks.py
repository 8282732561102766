"""ModelMergeSD1 / ModelMergeSDXL: per-block ratios by ComfyUI's longest-prefix rule on the LDM keys.

The expected weights are computed from the checkpoint files themselves (LDM keys, fp16 -> fp32):
`W1 · r + (1 − r) · W2`, r the ratio of the longest input name the key starts with, else the
first input's; the merged UNet's parameters are found by the loader's key map, not the merge code's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from nodegraph.engine import Settings, build_engine
from nodegraph.testing import RecordingContext
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.merge_blocks import SD1_PREFIXES, SDXL_PREFIXES, ModelMergeSD1, ModelMergeSDXL
from nodes.sd.checkpoint import ldm_names, load_checkpoint
from nodes.sd.handles import ModelHandle
from nodes.sd.merge import MergeRef
from nodes.sd.patcher import patched, restore

UNET = "model.diffusion_model."


def comfy_ratio(key: str, ratios: dict[str, float]) -> float:
    """ModelMergeBlocks.merge's loop, written out: the default is the first kwarg's value."""
    ratio = next(iter(ratios.values()))
    longest = 0
    for arg, value in ratios.items():
        if key.startswith(arg) and longest < len(arg):
            ratio, longest = value, len(arg)
    return ratio


def random_ratios(prefixes: list[str], seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {p: round(rng.random(), 2) for p in prefixes}


def test_sd1_merge_matches_the_files_blended_by_block(
    ctx: RecordingContext, mini_checkpoint: Path, mini_checkpoint_seed1: Path
) -> None:
    a, b = load_checkpoint(mini_checkpoint), load_checkpoint(mini_checkpoint_seed1)
    m1 = ModelHandle(a.unet, mini_checkpoint.name, a.family)
    m2 = ModelHandle(b.unet, mini_checkpoint_seed1.name, b.family)
    ratios = random_ratios(SD1_PREFIXES, 0)
    (merged,) = ModelMergeSD1().run(ctx, m1, m2, **ratios)
    assert merged.unet is a.unet and len(merged.loras) == 1  # a patch, no copy
    before = {k: v.detach().clone() for k, v in a.unet.named_parameters()}
    names = ldm_names(a.unet)
    assert names is not None
    seen_ratios = set()
    with safe_open(mini_checkpoint, "pt") as f1, safe_open(mini_checkpoint_seed1, "pt") as f2:
        with patched(a.unet, merged.loras, target="unet", exact=True):
            params = dict(a.unet.named_parameters())
            for ldm, name in names.items():
                r = comfy_ratio(ldm[len(UNET) :], ratios)
                seen_ratios.add(r)
                want = f1.get_tensor(ldm).float() * r + (1.0 - r) * f2.get_tensor(ldm).float()
                torch.testing.assert_close(params[name].detach(), want, rtol=0, atol=1e-6, msg=ldm)
        restore(a.unet)
    assert len(seen_ratios) >= 10  # the mini UNet's blocks took many different ratios
    assert all(torch.equal(p, before[k]) for k, p in a.unet.named_parameters())


def test_sdxl_ratio_of_every_parameter_follows_comfyui(
    ctx: RecordingContext, sdxl_store: Any, mini_sdxl_checkpoint: Path
) -> None:
    ckpt = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    model = ModelHandle(ckpt.unet, mini_sdxl_checkpoint.name, ckpt.family)
    ratios = random_ratios(SDXL_PREFIXES, 1)
    (merged,) = ModelMergeSDXL().run(ctx, model, model, **ratios)
    ref = merged.loras[-1]
    assert isinstance(ref, MergeRef)
    names = ldm_names(ckpt.unet)
    assert names is not None
    updates = ref.updates(ckpt.unet, "unet")
    per_block = {}
    for ldm, name in names.items():
        key = ldm[len(UNET) :]
        r = comfy_ratio(key, ratios)
        assert (updates[name].strength_patch, updates[name].strength_model) == (1.0 - r, r), ldm
        per_block[key.split(".")[0]] = True
    blocks = {"label_emb", "time_embed", "input_blocks", "middle_block", "output_blocks", "out"}
    assert blocks <= set(per_block)


def test_sdxl_merge_of_a_model_with_itself_keeps_its_weights(
    ctx: RecordingContext, sdxl_store: Any, mini_sdxl_checkpoint: Path
) -> None:
    ckpt = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    model = ModelHandle(ckpt.unet, mini_sdxl_checkpoint.name, ckpt.family)
    (merged,) = ModelMergeSDXL().run(ctx, model, model, **random_ratios(SDXL_PREFIXES, 2))
    layer = ckpt.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    before = layer.weight.detach().clone()
    with patched(ckpt.unet, merged.loras, target="unet", exact=True):
        torch.testing.assert_close(layer.weight.detach(), before, rtol=0, atol=1e-6)
    restore(ckpt.unet)


def test_models_of_two_families_are_refused(
    ctx: RecordingContext, sdxl_store: Any, mini_sdxl_checkpoint: Path, mini_checkpoint: Path
) -> None:
    xl = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    sd = load_checkpoint(mini_checkpoint)
    with pytest.raises(ValueError, match="only models of one family merge"):
        ModelMergeSDXL().run(
            ctx,
            ModelHandle(xl.unet, "xl", xl.family),
            ModelHandle(sd.unet, "sd", sd.family),
            **dict.fromkeys(SDXL_PREFIXES, 0.5),
        )


def test_workflow_merges_by_block_and_saves_comfyuis_layout(
    tmp_path: Path, mini_checkpoint: Path, mini_checkpoint_seed1: Path
) -> None:
    """Through validation and the executor (dotted input names from a prompt), into CheckpointSave."""
    ckpts = tmp_path / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "a.safetensors").symlink_to(mini_checkpoint)
    (ckpts / "b.safetensors").symlink_to(mini_checkpoint_seed1)
    engine = build_engine(Settings(base_directory=tmp_path, preview_method="none"), all_nodes())
    ratios = random_ratios(SD1_PREFIXES, 3)
    prompt = {
        "a": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
        "b": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
        "m": {"class_type": "ModelMergeSD1", "inputs": {"model1": ["a", 0], "model2": ["b", 0], **ratios}},
        "s": {
            "class_type": "CheckpointSave",
            "inputs": {"model": ["m", 0], "clip": ["a", 1], "vae": ["a", 2], "filename_prefix": "merged/x"},
        },
    }
    bad = json.loads(json.dumps(prompt))
    bad["m"]["inputs"]["input_blocks.3."] = 1.5
    refused = validate_prompt(bad, engine.registry, engine.env)
    assert not refused.ok and "input_blocks.3." in json.dumps(refused.node_errors)
    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok, checked.node_errors
    outcome = engine.executor.execute(checked.prompt, "p", lambda event: None, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    saved = tmp_path / "output" / "merged" / "x_00001_.safetensors"
    with safe_open(mini_checkpoint, "pt") as f1, safe_open(mini_checkpoint_seed1, "pt") as f2:
        with safe_open(saved, "pt") as out:
            assert set(out.keys()) >= set(f1.keys()) - {k for k in f1.keys() if "position_ids" in k}
            assert json.loads(out.metadata()["prompt"])["m"]["class_type"] == "ModelMergeSD1"
            for key in f1.keys():
                if key.startswith(UNET):
                    r = comfy_ratio(key[len(UNET) :], ratios)
                    want = f1.get_tensor(key).float() * r + (1.0 - r) * f2.get_tensor(key).float()
                    assert torch.equal(out.get_tensor(key), want.half()), key
                elif not key.endswith("position_ids"):  # CLIP and VAE are model1's
                    assert torch.equal(out.get_tensor(key), f1.get_tensor(key)), key
