"""The guidance patch nodes end to end: PerpNeg / PerpNegGuider through KSampler and
SamplerCustomAdvanced on a tiny UNet, SelfAttentionGuidance on the mini SDXL model (middle block
at latent / 4), and their errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes import custom_sampling as cs
from nodes.conditioning import CLIPTextEncode
from nodes.guidance_patches import DifferentialDiffusion, PerpNeg, PerpNegGuider, SelfAttentionGuidance
from nodes.loaders import CheckpointLoaderSimple
from nodes.sd import unet_patches
from nodes.sd.handles import ModelHandle
from tests.nodes.tiny_unet import cond, guided_euler
from tests.sd.test_cfg_patches import denoiser, expected_sag


def test_perp_neg_guider_without_negative_is_cfg_against_the_empty_prompt(
    ctx: RecordingContext, model: ModelHandle
) -> None:
    def run(guider: Any) -> torch.Tensor:
        return guided_euler(ctx, model, guider)  # the sigmas of the unpatched model, for every guider

    (perp0,) = PerpNegGuider().run(ctx, model, cond(1), cond(2), cond(3), 5.0, 0.0)
    (cfg,) = cs.CFGGuider().run(ctx, model, cond(1), cond(3), 5.0)
    assert torch.allclose(run(perp0), run(cfg), rtol=1e-5, atol=1e-4)
    (perp,) = PerpNegGuider().run(ctx, model, cond(1), cond(2), cond(3), 5.0, 1.5)
    (patched,) = PerpNeg().run(ctx, model, cond(3), 1.5)
    (cfg_patched,) = cs.CFGGuider().run(ctx, patched, cond(1), cond(2), 5.0)
    assert torch.allclose(run(perp), run(cfg_patched), rtol=1e-5, atol=1e-4)  # the same formula
    assert (run(perp) - run(perp0)).abs().max() > 1e-3


def test_nodes_add_patches_as_data_and_name_bad_inputs(ctx: RecordingContext, model: ModelHandle) -> None:
    (sag,) = SelfAttentionGuidance().run(ctx, model, 0.5, 2.0)
    (diff,) = DifferentialDiffusion().run(ctx, sag)
    assert diff.patches == (unet_patches.SelfAttention(0.5, 2.0), unet_patches.DifferentialDiffusion(1.0))
    assert model.patches == () and diff.unet is model.unet
    with pytest.raises(ValueError, match="SelfAttentionGuidance: model: expected a MODEL"):
        SelfAttentionGuidance().run(ctx, None, 0.5, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PerpNegGuider: input empty_conditioning needs a CONDITIONING"):
        PerpNegGuider().run(ctx, model, cond(1), cond(2), [], 5.0, 1.0)


def test_self_attention_guidance_on_sdxl(sdxl_env: Environment) -> None:
    ctx = RecordingContext(sdxl_env)
    model, clip, _ = CheckpointLoaderSimple().run(ctx, "mini_sdxl.safetensors")
    positive = CLIPTextEncode().run(ctx, "a photo of a cat", clip)[0]
    negative = CLIPTextEncode().run(ctx, "blurry", clip)[0]
    (sag,) = SelfAttentionGuidance().run(ctx, model, 0.7, 2.0)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 4.0
    sigma = torch.tensor([4.0])
    with torch.no_grad():
        want, covered = expected_sag(model.unet, x, sigma, 5.0, 0.7, 2.0, down=4, conds=(positive, negative))
        with unet_patches.applied(sag.unet, sag.patches):
            got = denoiser(sag.unet, positive, negative, 5.0)(x, sigma)
    assert 0.0 < covered < 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
