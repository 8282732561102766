"""DualCFGGuider applies the MODEL's CFG patches in its cfg_function call, as ComfyUI's Guider_DualCFG
does: with cond1 = cond2 the regular mix is `cfg_function(cond2, negative, cfg2)`, which is what
CFGGuider computes, patches included; nested with cfg_cond2_negative 1 is `cfg_function(cond1, cond2,
cfg1)`, CFGGuider with cond2 as its negative. Checked on a tiny random UNet with RescaleCFG and PAG."""

from __future__ import annotations

from nodegraph.testing import RecordingContext
from nodes import custom_sampling as cs
from nodes.model_patches import PerturbedAttentionGuidance, RescaleCFG
from nodes.sd.handles import ModelHandle
from tests.conftest import assert_within_floor
from tests.nodes.tiny_unet import cond, guided_euler


def patched(ctx: RecordingContext, model: ModelHandle) -> ModelHandle:
    (rescaled,) = RescaleCFG().run(ctx, model, 0.7)
    (pag,) = PerturbedAttentionGuidance().run(ctx, rescaled, 2.0)
    return pag


def test_regular_dual_cfg_with_one_prompt_twice_is_cfg_with_the_patches(
    ctx: RecordingContext, model: ModelHandle
) -> None:
    with_patches = patched(ctx, model)
    (dual,) = cs.DualCFGGuider().run(ctx, with_patches, cond(1), cond(1), cond(2), 3.0, 6.0, "regular")
    (cfg,) = cs.CFGGuider().run(ctx, with_patches, cond(1), cond(2), 6.0)
    got, want = guided_euler(ctx, with_patches, dual), guided_euler(ctx, with_patches, cfg)
    assert_within_floor(got, want)  # the three-side batch rounds apart from the two-side one only
    (plain_dual,) = cs.DualCFGGuider().run(ctx, model, cond(1), cond(1), cond(2), 3.0, 6.0, "regular")
    plain = guided_euler(ctx, model, plain_dual)
    assert (plain - want).abs().max() > 100 * 3e-5 * want.abs().max()  # the patches do change it


def test_nested_dual_cfg_applies_the_patches_to_cond1_against_cond2(
    ctx: RecordingContext, model: ModelHandle
) -> None:
    with_patches = patched(ctx, model)
    (nested,) = cs.DualCFGGuider().run(ctx, with_patches, cond(1), cond(3), cond(2), 5.0, 1.0, "nested")
    (cfg,) = cs.CFGGuider().run(ctx, with_patches, cond(1), cond(3), 5.0)
    assert_within_floor(guided_euler(ctx, with_patches, nested), guided_euler(ctx, with_patches, cfg))
