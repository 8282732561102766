"""Strength changes as runtime branches: no weight rewritten, same output, fused once settled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_fixtures import kohya, loha, mini_models, write

from nodes.sd.handles import LoraRef
from nodes.sd.lora.loader import decoded, file_stamp
from nodes.sd.patcher import apply_stack, branched, held_bytes, patched, restore

# Linear, 3x3 conv, stride-2 conv (downsampler), 1x1 conv and a conv with its own padding.
MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.0.attentions.0.proj_in",
    "up_blocks.0.resnets.0.conv_shortcut",
    "conv_in",
]


@pytest.fixture(scope="module")
def models(mini_checkpoint: Path) -> tuple[Any, Any]:
    return mini_models(mini_checkpoint)


@pytest.fixture(scope="module")
def files(models: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    unet, te = models
    folder = tmp_path_factory.mktemp("branch_loras")
    return {
        "locon": write(folder / "locon.safetensors", kohya(unet, te, MODULES, [], 4, 2.0, torch.float16)),
        "other": write(
            folder / "other.safetensors", kohya(unet, te, MODULES[:3], [], 8, 8.0, torch.bfloat16, seed=3)
        ),
        "loha": write(
            folder / "loha.safetensors", loha(unet, "lora_unet_", MODULES[:2], 4, 4.0, torch.float32)
        ),
    }


def _ref(path: Path, strength: float) -> LoraRef:
    return LoraRef(path, file_stamp(path), strength, path.stem)


def _snapshot(module: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(module: Any, other: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, other[n]) for n, p in module.named_parameters())


def _hooks(module: Any) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def _run(unet: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 16, 16), generator=gen)
    ctx = torch.randn((2, 77, unet.config.cross_attention_dim), generator=gen)
    with torch.inference_mode():
        return unet(x, torch.tensor([500.0, 20.0]), ctx).sample.clone()


def _fresh(unet: Any, stack: list[LoraRef]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    restore(unet)
    apply_stack(unet, stack, "unet", exact=True)
    return _snapshot(unet), _run(unet)


def test_strength_change_rewrites_nothing_and_matches_the_fused_output(
    models: Any, files: dict[str, Path]
) -> None:
    unet, _ = models
    a1, a04 = _ref(files["locon"], 1.0), _ref(files["locon"], -0.4)
    weights_04, out_04 = _fresh(unet, [a04])
    weights_1, out_1 = _fresh(unet, [a1])
    try:
        assert apply_stack(unet, [a04], "unet") == 0
        assert _same(unet, weights_1)  # the weights still hold strength 1
        assert branched(unet) == len(MODULES)
        out_branch = _run(unet)
        err = (out_branch - out_04).abs().max()
        assert err <= 1e-5 * out_04.abs().max()
        assert (out_1 - out_04).abs().max() > 1000 * err  # the change itself is far larger
        keys = len(decoded(a1.path, a1.stamp, unet, "unet").updates)
        assert apply_stack(unet, [a04], "unet") == keys  # asked again: settled, fused exactly
        assert branched(unet) == 0 and _hooks(unet) == 0
        assert _same(unet, weights_04)
        assert torch.equal(_run(unet), out_04)
    finally:
        restore(unet)


def test_one_of_two_chained_loras_changed(models: Any, files: dict[str, Path]) -> None:
    unet, _ = models
    a, b = _ref(files["locon"], 0.8), _ref(files["other"], -0.5)
    _, want = _fresh(unet, [a, _ref(files["other"], 1.7)])
    _fresh(unet, [a, b])
    try:
        assert apply_stack(unet, [a, _ref(files["other"], 1.7)], "unet") == 0
        assert branched(unet) == 3  # only the layers of the changed LoRA
        assert (_run(unet) - want).abs().max() <= 1e-5 * want.abs().max()
        assert apply_stack(unet, [a, _ref(files["locon"], 0.2)], "unet") > 0  # a swap: rebuilt exactly
        assert branched(unet) == 0
    finally:
        restore(unet)


def test_back_to_the_fused_strength_drops_the_branches(models: Any, files: dict[str, Path]) -> None:
    unet, _ = models
    a = _ref(files["locon"], 1.0)
    weights, _ = _fresh(unet, [a])
    try:
        apply_stack(unet, [_ref(files["locon"], 0.3)], "unet")
        assert branched(unet) > 0
        assert apply_stack(unet, [a], "unet") == 0
        assert branched(unet) == 0 and _hooks(unet) == 0 and _same(unet, weights)
    finally:
        restore(unet)


def test_what_cannot_branch_is_rebuilt_exactly(models: Any, files: dict[str, Path]) -> None:
    unet, te = models
    h = _ref(files["loha"], 1.0)
    weights, _ = _fresh(unet, [_ref(files["loha"], 0.6)])
    _fresh(unet, [h])
    try:
        assert apply_stack(unet, [_ref(files["loha"], 0.6)], "unet") > 0  # LoHa: dense update
        assert branched(unet) == 0 and _same(unet, weights)
        apply_stack(unet, [_ref(files["locon"], 1.0)], "unet", exact=True)
        with patched(unet, [_ref(files["locon"], 0.5)], target="unet", exact=True):
            assert branched(unet) == 0  # CheckpointSave reads the weights: they hold the stack
        apply_stack(unet, [_ref(files["locon"], 0.0)], "unet")  # strength 0 is a removal
        assert branched(unet) == 0 and _hooks(unet) == 0
    finally:
        restore(unet)
    base = _snapshot(te)
    mini = Path(files["locon"]).parent  # a TE strength change is always an exact rebuild
    te_file = write(
        mini / "te.safetensors", kohya(unet, te, [], ["encoder.layers.0.mlp.fc1"], 4, 4.0, torch.float16)
    )
    try:
        apply_stack(te, [_ref(te_file, 1.0)], "te")
        assert apply_stack(te, [_ref(te_file, 0.5)], "te") == 1
        assert branched(te) == 0
    finally:
        restore(te)
    assert _same(te, base)


def test_restore_after_branches_leaves_the_file_weights(models: Any, files: dict[str, Path]) -> None:
    unet, _ = models
    restore(unet)
    base = _snapshot(unet)
    apply_stack(unet, [_ref(files["locon"], 1.0), _ref(files["other"], 0.5)], "unet")
    apply_stack(unet, [_ref(files["locon"], 2.0), _ref(files["other"], -1.0)], "unet")
    assert branched(unet) > 0
    restore(unet)
    assert branched(unet) == 0 and _hooks(unet) == 0 and _same(unet, base)


def test_te_strength_changes_reuse_the_kept_delta_and_equal_a_fresh_application(
    models: Any, mini_loras: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, te = models
    base = _snapshot(te)
    a, b = mini_loras / "mini_lora_a.safetensors", mini_loras / "mini_lora_b.safetensors"
    sequence = [
        [_ref(a, 1.0), _ref(b, 0.5)],
        [_ref(a, 0.3), _ref(b, 0.5)],  # a adjusted: its ΔW is kept
        [_ref(a, -0.7), _ref(b, 0.5)],  # ... and reused
        [_ref(a, -0.7), _ref(b, 1.4)],  # b adjusted: the kept ΔW switches to b
        [_ref(a, 2.0), _ref(a, 0.5)],  # the same LoRA twice
        [_ref(b, 0.5)],
    ]
    try:
        for stack in sequence:
            apply_stack(te, stack, "te")
            got = _snapshot(te)
            restore(te)
            apply_stack(te, stack, "te")  # a fresh application
            assert _same(te, got), stack
            restore(te)
            for earlier in sequence[: sequence.index(stack) + 1]:  # back to the state in the sequence
                apply_stack(te, earlier, "te")
        restore(te)
        apply_stack(te, [_ref(a, 1.0)], "te")
        apply_stack(te, [_ref(a, 0.5)], "te")  # fills the kept ΔW
        calls: list[int] = []
        real_mm = torch.mm
        monkeypatch.setattr(torch, "mm", lambda *x, **k: calls.append(1) or real_mm(*x, **k))
        apply_stack(te, [_ref(a, -0.25)], "te")
        monkeypatch.undo()
        assert calls == []  # no rank-r product: the kept ΔW was added
        got = _snapshot(te)
        restore(te)
        apply_stack(te, [_ref(a, -0.25)], "te")
        assert _same(te, got)
    finally:
        monkeypatch.undo()
        restore(te)
    assert _same(te, base)


def test_backups_of_fp16_valued_weights_are_fp16_and_restore_exactly(
    models: Any, files: dict[str, Path]
) -> None:
    unet, _ = models
    restore(unet)
    base = _snapshot(unet)
    params = dict(unet.named_parameters())
    keys = decoded(files["locon"], file_stamp(files["locon"]), unet, "unet").updates
    try:
        apply_stack(unet, [_ref(files["locon"], 1.0)], "unet")
        # The mini checkpoint is stored in fp16: every backup is exact in half the bytes.
        assert held_bytes(unet) == sum(params[k].numel() * 2 for k in keys)
        restore(unet)
        with torch.no_grad():
            params[MODULES[0] + ".weight"].mul_(1 + 1e-6)  # a weight that no longer holds fp16 values
        off = params[MODULES[0] + ".weight"].detach().clone()
        apply_stack(unet, [_ref(files["locon"], 1.0)], "unet")
        assert (
            held_bytes(unet)
            == sum(params[k].numel() * 2 for k in keys) + params[MODULES[0] + ".weight"].numel() * 2
        )
        restore(unet)
        assert torch.equal(params[MODULES[0] + ".weight"], off)  # kept in fp32, restored exactly
    finally:
        with torch.no_grad():
            params[MODULES[0] + ".weight"].copy_(base[MODULES[0] + ".weight"])
        restore(unet)
    assert _same(unet, base)
