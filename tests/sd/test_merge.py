"""Model merging as patches: ComfyUI's `W·strength_model + strength_patch·W2` per weight, in fp32,
applied and undone by the patcher on shared weights (small random modules, no files)."""

from __future__ import annotations

import torch

from nodes.sd.merge import MergeRef
from nodes.sd.patcher import held_bytes, patched


def module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.half().float())  # fp16 values, as in a checkpoint
    return net


def weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def test_simple_subtract_add_follow_comfyui() -> None:
    a, b = module(0), module(1)
    wa, wb = weights(a), weights(b)
    for constant, expect in (
        ((1.0 - 0.6, 0.6), lambda x, y: x * 0.6 + (1.0 - 0.6) * y),  # ModelMergeSimple(0.6)
        ((-2.0, 2.0), lambda x, y: x * 2.0 + -2.0 * y),  # ModelMergeSubtract(2)
        ((1.0, 1.0), lambda x, y: x + 1.0 * y),  # ModelMergeAdd
    ):
        ref = MergeRef(b, (), "unet", "test", constant=constant)
        with patched(a, [ref], target="unet"):
            for name, p in a.named_parameters():
                assert torch.equal(p, expect(wa[name], wb[name])), name
    with patched(a, [], target="unet"):
        assert all(torch.equal(p, wa[k]) for k, p in a.named_parameters())  # exactly restored
    assert held_bytes(a) == 0
    assert all(torch.equal(p, wb[k]) for k, p in b.named_parameters())  # model2 never changes


def test_model2_is_taken_as_it_computes_and_te_rounds_once() -> None:
    a, b, c = module(0), module(1), module(2)
    wa, wb, wc = weights(a), weights(b), weights(c)
    inner = MergeRef(c, (), "te", "inner", constant=(0.5, 0.5))  # b' = 0.5·b + 0.5·c
    outer = MergeRef(b, (inner,), "te", "outer", constant=(0.3, 0.7))  # a' = 0.7·a + 0.3·b'
    with patched(b, [inner], target="te"):  # model2 held patched by someone else: still read from base
        pass
    with patched(a, [outer], target="te"):
        for name, p in a.named_parameters():
            b2 = wb[name] * 0.5 + 0.5 * wc[name]
            want = (wa[name] * 0.7 + 0.3 * b2).half().float()
            assert torch.equal(p, want), name
    assert outer.path != MergeRef(b, (), "te", "outer", constant=(0.3, 0.7)).path


def test_a_shape_mismatch_is_left_alone() -> None:
    a = module(0)
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 5))
    wa = weights(a)
    with patched(a, [MergeRef(b, (), "unet", "x", constant=(0.5, 0.5))], target="unet"):
        assert torch.equal(a[1].weight, wa["1.weight"])
        assert not torch.equal(a[0].weight, wa["0.weight"])
