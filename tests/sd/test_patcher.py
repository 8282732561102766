"""The patcher: bit-exact restore after any sequence, only affected weights touched, ComfyUI's TE rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_fixtures import mini_models
from safetensors.torch import load_file

from nodes.sd.handles import LoraRef
from nodes.sd.lora.coverage import coverage
from nodes.sd.lora.loader import decoded, file_stamp, read_lora
from nodes.sd.patcher import apply_stack, patched, restore


@pytest.fixture(scope="module")
def models(mini_checkpoint: Path) -> tuple[Any, Any]:
    return mini_models(mini_checkpoint)


def _ref(folder: Path, name: str, strength: float) -> LoraRef:
    path = folder / f"{name}.safetensors"
    return LoraRef(path, file_stamp(path), strength, name)


def _snapshot(module: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_base(module: Any, base: dict[str, torch.Tensor]) -> None:
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, base[n])]
    assert not changed, changed[:5]


def _kohya_delta(sd: dict[str, torch.Tensor], stem: str, shape: torch.Size) -> torch.Tensor:
    """The oracle README's merge: (alpha/rank)·(up.flatten(1) @ down.flatten(1)).reshape(W.shape)."""
    down, up = sd[stem + ".lora_down.weight"].float(), sd[stem + ".lora_up.weight"].float()
    return (float(sd[stem + ".alpha"].float()) / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(
        shape
    )


def test_oracle_lora_coverage_counts(models: Any, mini_loras: Path) -> None:
    unet, te = models
    for name, counts in (("mini_lora_a", (52, 72)), ("mini_lora_b", (22, 36))):
        ref = _ref(mini_loras, name, 1.0)
        report = coverage(
            read_lora(ref.path, ref.stamp),
            name,
            decoded(ref.path, ref.stamp, unet, "unet"),
            decoded(ref.path, ref.stamp, te, "te"),
        )
        assert (report.unet_weights, report.te_weights) == counts
        assert (report.unmatched, report.failed, report.family) == ((), (), "sd15")


def test_any_sequence_of_stacks_restores_bit_exact(models: Any, mini_loras: Path) -> None:
    unet, te = models
    base_u, base_t = _snapshot(unet), _snapshot(te)
    a1, a05, b = (
        _ref(mini_loras, "mini_lora_a", 1.0),
        _ref(mini_loras, "mini_lora_a", 0.5),
        _ref(mini_loras, "mini_lora_b", -0.3),
    )
    for stack in ([a1], [a05], [a05, b], [b], [b, a1], [a1, a1], []):
        apply_stack(unet, stack, "unet")
        apply_stack(te, stack, "te")
    _assert_base(unet, base_u)
    _assert_base(te, base_t)


def test_changed_stack_equals_a_fresh_application(models: Any, mini_loras: Path) -> None:
    unet, _ = models
    a, b = _ref(mini_loras, "mini_lora_a", 0.8), _ref(mini_loras, "mini_lora_b", -1.5)
    apply_stack(unet, [a, b], "unet")
    fresh = _snapshot(unet)
    restore(unet)
    for stack in ([a], [_ref(mini_loras, "mini_lora_a", 3.0), b], [b], [a, b]):
        apply_stack(unet, stack, "unet")
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, fresh[n])]
    restore(unet)
    assert not changed


def test_only_affected_weights_are_rewritten(models: Any, mini_loras: Path) -> None:
    unet, _ = models
    a, b = _ref(mini_loras, "mini_lora_a", 1.0), _ref(mini_loras, "mini_lora_b", 1.0)
    keys_a = set(decoded(a.path, a.stamp, unet, "unet").updates)
    keys_b = set(decoded(b.path, b.stamp, unet, "unet").updates)
    try:
        assert apply_stack(unet, [a], "unet") == len(keys_a)
        assert apply_stack(unet, [a], "unet") == 0  # same stack: free
        assert apply_stack(unet, [a, b], "unet") == len(keys_b)  # a-only weights are left alone
        b03 = _ref(mini_loras, "mini_lora_b", 0.3)
        assert apply_stack(unet, [a, b03], "unet") == 0  # a strength change: runtime branches
        assert apply_stack(unet, [a, b03], "unet") == len(keys_b)  # asked again: b's keys fused
        assert apply_stack(unet, [a], "unet") == len(keys_b)  # b's keys recomputed or restored
    finally:
        restore(unet)


def test_zero_strength_is_a_no_op(models: Any, mini_loras: Path) -> None:
    unet, _ = models
    base = _snapshot(unet)
    assert apply_stack(unet, [_ref(mini_loras, "mini_lora_a", 0.0)], "unet") == 0
    _assert_base(unet, base)


def test_chained_te_loras_round_to_fp16_once_after_the_sum(models: Any, mini_loras: Path) -> None:
    _, te = models
    sa = load_file(str(mini_loras / "mini_lora_a.safetensors"))
    sb = load_file(str(mini_loras / "mini_lora_b.safetensors"))
    name, stem = (
        "encoder.layers.2.self_attn.q_proj.weight",
        "lora_te_text_model_encoder_layers_2_self_attn_q_proj",
    )
    w = dict(te.named_parameters())[name].detach().clone()
    da, db = _kohya_delta(sa, stem, w.shape), _kohya_delta(sb, stem, w.shape)
    once = (w + 0.9 * da - 1.3 * db).half().float()
    twice = ((w + 0.9 * da).half().float() - 1.3 * db).half().float()
    assert not torch.equal(once, twice)  # the convention is observable on this weight
    with patched(
        te, [_ref(mini_loras, "mini_lora_a", 0.9), _ref(mini_loras, "mini_lora_b", -1.3)], target="te"
    ):
        got = dict(te.named_parameters())[name].detach().clone()
    restore(te)
    assert (got == once).float().mean() > 0.999 and torch.allclose(got, once, rtol=2e-3, atol=1e-7)


def test_unet_loras_merge_in_fp32_without_rounding(models: Any, mini_loras: Path) -> None:
    unet, _ = models
    sa = load_file(str(mini_loras / "mini_lora_a.safetensors"))
    name = "down_blocks.0.resnets.0.conv1.weight"
    w = dict(unet.named_parameters())[name].detach().clone()
    want = w + 0.37 * _kohya_delta(sa, "lora_unet_down_blocks_0_resnets_0_conv1", w.shape)
    with patched(unet, [_ref(mini_loras, "mini_lora_a", 0.37)], target="unet"):
        got = dict(unet.named_parameters())[name].detach().clone()
    restore(unet)
    assert not torch.equal(got, got.half().float())  # not rounded to fp16
    assert (got - want).abs().max() <= 1e-6 * (want - w).abs().max()


def test_weights_stay_patched_after_the_block_until_another_stack(models: Any, mini_loras: Path) -> None:
    unet, _ = models
    base = _snapshot(unet)
    a = _ref(mini_loras, "mini_lora_a", 1.0)
    with patched(unet, [a], target="unet"):
        pass
    assert apply_stack(unet, [a], "unet") == 0
    with patched(unet, [], target="unet"):
        _assert_base(unet, base)
