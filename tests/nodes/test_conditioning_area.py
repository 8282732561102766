"""Regional-prompt nodes and ImagePadForOutpaint: declarations, values, and a workflow end to end.

The sampling numbers are checked in tests/sd/test_guidance_area.py; here the nodes' outputs are
checked against ComfyUI's nodes.py and a regional-prompt outpaint workflow runs through the real
executor on the mini checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from nodegraph.engine import Settings, build_engine
from nodegraph.events import Event
from nodegraph.testing import RecordingContext
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.conditioning_area import (
    ConditioningSetArea,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
)
from nodes.outpaint import ImagePadForOutpaint
from nodes.sd.latent_ops import load_latent_file
from tests.conftest import ORACLE

RES = 16384  # ComfyUI's MAX_RESOLUTION
STRENGTH = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}]
STEP8 = {"default": 0, "min": 0, "max": RES, "step": 8}


def test_area_nodes_set_comfyuis_options_without_touching_their_input(ctx: RecordingContext) -> None:
    emb = torch.zeros(1, 77, 8)
    cond = [[emb, {"pooled_output": None, "strength": 0.3}]]
    (area,) = ConditioningSetArea().run(ctx, cond, 200, 96, 36, 8, 2.0)
    assert area[0][1] == {
        "pooled_output": None, "strength": 2.0, "area": (12, 25, 1, 4), "set_area_to_bounds": False
    }  # fmt: skip
    assert area[0][0] is emb and cond[0][1] == {"pooled_output": None, "strength": 0.3}
    (pct,) = ConditioningSetAreaPercentage().run(ctx, cond, 0.5, 0.25, 0.1, 0.2, 1.5)
    assert pct[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1) and pct[0][1]["strength"] == 1.5
    (strong,) = ConditioningSetAreaStrength().run(ctx, area, 4.0)
    assert strong[0][1]["strength"] == 4.0 and strong[0][1]["area"] == (12, 25, 1, 4)
    assert area[0][1]["strength"] == 2.0
    mask = torch.rand(64, 64)
    (masked,) = ConditioningSetMask().run(ctx, cond, mask, 0.7, "default")
    opts = masked[0][1]
    assert opts["mask"].shape == (1, 64, 64) and torch.equal(opts["mask"][0], mask)
    assert (opts["set_area_to_bounds"], opts["mask_strength"], opts["strength"]) == (False, 0.7, 0.3)
    (bounded,) = ConditioningSetMask().run(ctx, cond, mask[None], 1.0, "mask bounds")
    assert bounded[0][1]["set_area_to_bounds"] is True and bounded[0][1]["mask"].shape == (1, 64, 64)


def comfy_expand_image(
    image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ImagePadForOutpaint.expand_image, pixel by pixel."""
    d1, d2, d3, d4 = image.size()
    new_image = torch.ones((d1, d2 + top + bottom, d3 + left + right, d4), dtype=torch.float32) * 0.5
    new_image[:, top : top + d2, left : left + d3, :] = image
    mask = torch.ones((d2 + top + bottom, d3 + left + right), dtype=torch.float32)
    t = torch.zeros((d2, d3), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < d2 and feathering * 2 < d3:
        for i in range(d2):
            for j in range(d3):
                dt = i if top != 0 else d2
                db = d2 - i if bottom != 0 else d2
                dl = j if left != 0 else d3
                dr = d3 - j if right != 0 else d3
                d = min(dt, db, dl, dr)
                if d >= feathering:
                    continue
                v = (feathering - d) / feathering
                t[i, j] = v * v
    mask[top : top + d2, left : left + d3] = t
    return new_image, mask.unsqueeze(0)


@pytest.mark.parametrize(
    "pads",
    [
        (8, 0, 16, 0, 5),
        (0, 8, 0, 8, 3),
        (8, 16, 8, 24, 7),
        (0, 0, 8, 0, 0),
        (16, 0, 0, 0, 12),
        (8, 8, 8, 8, 40),
    ],
)
def test_outpaint_pad_matches_comfyui(ctx: RecordingContext, pads: tuple[int, int, int, int, int]) -> None:
    image = torch.rand(2, 22, 26, 3, generator=torch.Generator().manual_seed(1))
    padded, mask = ImagePadForOutpaint().run(ctx, image, *pads)
    expected_image, expected_mask = comfy_expand_image(image, *pads)
    assert padded.dtype == mask.dtype == torch.float32
    assert torch.equal(padded, expected_image)
    assert torch.equal(mask, expected_mask)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Any:
    base = tmp_path_factory.mktemp("regional")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    (base / "input").mkdir()
    shutil.copy(ORACLE / "workflows" / "init_64.png", base / "input" / "init_64.png")
    return build_engine(Settings(base_directory=base, preview_method="none"), all_nodes())


def _node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def _sampler(positive: list[Any]) -> dict[str, Any]:
    return _node(
        "KSampler", model=["ckpt", 0], positive=positive, negative=["neg", 0], latent_image=["encode", 0],
        seed=5, steps=2, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0,
    )  # fmt: skip


def test_regional_outpaint_workflow_runs_end_to_end(engine: Any) -> None:
    """Outpaint 64 px to the right with a prompt per half and a masked prompt on the new border."""
    clip = ["ckpt", 1]
    prompt = {
        "ckpt": _node("CheckpointLoaderSimple", ckpt_name="mini.safetensors"),
        "bg": _node("CLIPTextEncode", text="a landscape", clip=clip),
        "left": _node("CLIPTextEncode", text="a red house", clip=clip),
        "right": _node("CLIPTextEncode", text="a blue lake", clip=clip),
        "neg": _node("CLIPTextEncode", text="", clip=clip),
        "left_area": _node(
            "ConditioningSetArea", conditioning=["left", 0], width=64, height=64, x=0, y=0, strength=1.0
        ),
        "right_pct": _node(
            "ConditioningSetAreaPercentage",
            conditioning=["right", 0],
            width=0.5,
            height=1.0,
            x=0.5,
            y=0.0,
            strength=1.0,
        ),
        "right_strong": _node("ConditioningSetAreaStrength", conditioning=["right_pct", 0], strength=1.5),
        "image": _node("LoadImage", image="init_64.png"),
        "pad": _node(
            "ImagePadForOutpaint", image=["image", 0], left=0, top=0, right=64, bottom=0, feathering=16
        ),
        "border": _node(
            "ConditioningSetMask",
            conditioning=["bg", 0],
            mask=["pad", 1],
            strength=1.0,
            set_cond_area="mask bounds",
        ),
        "both": _node(
            "ConditioningCombine", conditioning_1=["left_area", 0], conditioning_2=["right_strong", 0]
        ),
        "all": _node("ConditioningCombine", conditioning_1=["both", 0], conditioning_2=["border", 0]),
        "encode": _node(
            "VAEEncodeForInpaint", pixels=["pad", 0], vae=["ckpt", 2], mask=["pad", 1], grow_mask_by=8
        ),
        "regional": _sampler(["all", 0]),
        "plain": _sampler(["bg", 0]),
        "decode": _node("VAEDecode", samples=["regional", 0], vae=["ckpt", 2]),
        "save": _node("SaveImage", images=["decode", 0], filename_prefix="regional"),
        "keep": _node("SaveLatent", samples=["regional", 0], filename_prefix="latents/regional"),
        "keep_plain": _node("SaveLatent", samples=["plain", 0], filename_prefix="latents/plain"),
    }
    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    events: list[Event] = []
    outcome = engine.executor.execute(checked.prompt, "regional", events.append, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    out_dir = Path(engine.env.folders.output_dir)

    def saved(entry: dict[str, str]) -> Path:
        return out_dir / entry["subfolder"] / entry["filename"]

    (entry,) = outcome.outputs["save"]["images"]
    with Image.open(saved(entry)) as image:
        assert image.size == (128, 64)
    regional = load_latent_file(saved(outcome.outputs["keep"]["latents"][0]))
    plain = load_latent_file(saved(outcome.outputs["keep_plain"]["latents"][0]))
    assert regional.shape == (1, 4, 8, 16) and torch.isfinite(regional).all()
    # the regional prompts change the outpainted half
    assert (regional[..., 8:] - plain[..., 8:]).abs().mean() > 1e-3 * plain.abs().mean()
