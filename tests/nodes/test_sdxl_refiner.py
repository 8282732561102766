"""SDXL base + refiner on small generated SGM checkpoints of both kinds (nodes/demo_sdxl.py).

The refiner file has bigG alone under `conditioner.embedders.0.model.*`, adm 2560 and context 1280,
like the real one. A KSamplerAdvanced hand-off from base to refiner runs, the refiner's UNet gets
ComfyUI's added conditioning (pooled, latent size × 8, crop 0, aesthetic score 6 / 2.5), and using
one model's CLIP or conditioning with the other is refused by name.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes import demo_sdxl
from nodes.conditioning import CLIPTextEncode
from nodes.conditioning_sdxl import CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.sampling import KSamplerAdvanced
from nodes.sd.adm import size_embedding


@pytest.fixture(scope="module")
def xl_env(tmp_path_factory: pytest.TempPathFactory) -> Environment:
    base = tmp_path_factory.mktemp("sdxl_refiner")
    ckpts = base / "models" / "checkpoints"
    demo_sdxl.write_sdxl_checkpoint(ckpts / "base.safetensors")
    demo_sdxl.write_sdxl_checkpoint(ckpts / "refiner.safetensors", demo_sdxl.REFINER_MINI, "refiner")
    return Environment(Folders.at(base))


@pytest.fixture(scope="module")
def loaded(xl_env: Environment) -> dict[str, Any]:
    ctx = RecordingContext(xl_env)
    base = CheckpointLoaderSimple().run(ctx, "base.safetensors")
    refiner = CheckpointLoaderSimple().run(ctx, "refiner.safetensors")
    return {"base": base, "refiner": refiner}


def test_the_refiner_is_read_from_its_tensors(loaded: dict[str, Any]) -> None:
    model, clip, vae = loaded["refiner"]
    assert model.family == clip.family == "sdxl_refiner"
    assert clip.text_encoder is None and type(clip.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    cfg = model.unet.config
    assert cfg.projection_class_embeddings_input_dim == 2560 and cfg.cross_attention_dim == 1280
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert tuple(cfg.attention_head_dim) == (2, 4, 4)  # 64-channel heads at widths 128/256/256
    assert vae.scaling_factor == pytest.approx(0.13025)
    base_model, base_clip, _ = loaded["base"]
    assert base_model.family == base_clip.family == "sdxl"


def test_refiner_conditioning_is_bigg_only_with_its_aesthetic_score(
    xl_env: Environment, loaded: dict[str, Any]
) -> None:
    ctx = RecordingContext(xl_env)
    _, clip, _ = loaded["refiner"]
    [[cond, options]] = CLIPTextEncodeSDXLRefiner().run(ctx, 3.5, 768, 512, "a red chair", clip)[0]
    assert cond.shape == (1, 77, 1280) and options["pooled_output"].shape == (1, 1280)
    assert (options["aesthetic_score"], options["width"], options["height"]) == (3.5, 768, 512)
    [[plain, plain_options]] = CLIPTextEncode().run(ctx, "a red chair", clip)[0]
    assert torch.equal(plain, cond) and torch.equal(plain_options["pooled_output"], options["pooled_output"])


def _added_embedding_inputs(unet: Any) -> tuple[list[torch.Tensor], Any]:
    seen: list[torch.Tensor] = []
    hook = unet.add_embedding.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    return seen, hook


def test_base_to_refiner_hand_off_feeds_the_refiner_its_added_conditioning(
    xl_env: Environment, loaded: dict[str, Any]
) -> None:
    ctx = RecordingContext(xl_env)
    base, base_clip, _ = loaded["base"]
    refiner, refiner_clip, _ = loaded["refiner"]
    pos, neg = (CLIPTextEncode().run(ctx, t, base_clip)[0] for t in ("a cat", "blurry"))
    rpos, rneg = (CLIPTextEncode().run(ctx, t, refiner_clip)[0] for t in ("a cat", "blurry"))
    latent = EmptyLatentImage().run(ctx, 64, 48, 1)[0]
    sampler = KSamplerAdvanced()
    common = {"noise_seed": 7, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
    first = sampler.run(
        ctx, base, "enable", positive=pos, negative=neg, latent_image=latent, start_at_step=0,
        end_at_step=3, return_with_leftover_noise="enable", **common,
    )[0]  # fmt: skip
    seen, hook = _added_embedding_inputs(refiner.unet)
    try:
        second = sampler.run(
            ctx, refiner, "disable", positive=rpos, negative=rneg, latent_image=first, start_at_step=3,
            end_at_step=10000, return_with_leftover_noise="disable", **common,
        )[0]  # fmt: skip
    finally:
        hook.remove()
    assert second["samples"].shape == (1, 4, 6, 8)
    assert not torch.equal(second["samples"], first["samples"])  # the refiner took the last step
    assert seen and all(y.shape[-1] == 2560 for y in seen)
    rows = torch.cat(seen)
    # adm = pooled 1280, then E(height 48), E(width 64), E(crop_h 0), E(crop_w 0), E(aesthetic score)
    sizes = size_embedding(torch.tensor([[48.0, 64.0, 0.0, 0.0]]))
    assert torch.allclose(rows[:, 1280:2304], sizes.expand(rows.shape[0], -1))
    scores = {
        float(s)
        for s in (6.0, 2.5)
        for r in rows
        if torch.allclose(r[2304:], size_embedding(torch.tensor([[s]]))[0])
    }
    assert scores == {6.0, 2.5}  # ComfyUI's defaults: 6 for the positive side, 2.5 for the negative


def test_mixing_base_and_refiner_is_refused_by_name(xl_env: Environment, loaded: dict[str, Any]) -> None:
    ctx = RecordingContext(xl_env)
    base, base_clip, _ = loaded["base"]
    refiner, refiner_clip, _ = loaded["refiner"]
    with pytest.raises(ValueError, match="'refiner.safetensors' is an SDXL refiner"):
        CLIPTextEncodeSDXL().run(ctx, refiner_clip, 1024, 1024, 0, 0, 1024, 1024, "a", "b")
    pos = CLIPTextEncode().run(ctx, "a cat", base_clip)[0]
    latent = EmptyLatentImage().run(ctx, 64, 64, 1)[0]
    with pytest.raises(ValueError, match="embedding width 2048 does not fit this model"):
        KSamplerAdvanced().run(
            ctx, refiner, "enable", 1, 2, 5.0, "euler", "normal", pos, pos, latent, 0, 10000, "disable"
        )
