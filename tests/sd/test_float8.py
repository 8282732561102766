"""fp8 storage + LoRA: each patched weight of an fp8 UNet is rounded back to fp8 stochastically,
seeded by the CRC-32 of its ComfyUI key (comfy/model_patcher.py patch_weight_to_device ->
comfy/float.py stochastic_rounding).

The rounding is checked element by element against a scalar restatement in numpy's float16 (the
fraction of the fp8 last place below the value, plus one uniform draw, floored), its draws taken from
the same seeded generator; and against facts that do not come from ComfyUI's code: CRC-32's check
value, every result is one of the two fp8 neighbours, and the rounding is unbiased on average.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_fixtures import kohya, write

from nodes.sd.float8 import FORMATS, key_seed, mark_storage, stochastic_round, storage_dtype
from nodes.sd.handles import LoraRef
from nodes.sd.lora.loader import file_stamp
from nodes.sd.patcher import apply_stack, branched, restore
from tests.sd.tiny_unet import tiny_unet

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def test_key_seed_is_crc32() -> None:
    assert key_seed("123456789") == 0xCBF43926  # the CRC-32 check value (poly 0xEDB88320 reflected)


def _scalar_reference(values: torch.Tensor, draws: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Per element, in numpy float16: scaled mantissa m (in fp8 last places), m + u rounded to
    float16, floored, and the fp8 value rebuilt from it; clamped to the format's range."""
    exponent_bits, mantissa_bits, bias = FORMATS[dtype]
    top = float(torch.finfo(dtype).max)
    out = []
    for v, u in zip(values.flatten().tolist(), draws.flatten().tolist(), strict=True):
        x = np.float16(v)
        magnitude = abs(float(x))
        if magnitude == 0.0:
            out.append(0.0)
            continue
        # the exponent as ComfyUI takes it, from a float16 log2: a value just below a power of two
        # can round up to the next exponent (its scaled mantissa is then slightly negative)
        e = min(max(math.floor(float(np.log2(np.float16(magnitude)))) + bias, 0), 2**exponent_bits - 1)
        if e > 0:
            m = (magnitude / 2.0 ** (e - bias) - 1.0) * 2**mantissa_bits
        else:
            m = magnitude / 2.0 ** (1 - bias - mantissa_bits)
        k = math.floor(float(np.float16(np.float16(m) + np.float16(u))))
        mantissa = k / 2**mantissa_bits
        rebuilt = 2.0 ** (e - bias) * (1.0 + mantissa) if e > 0 else 2.0 ** (1 - bias) * mantissa
        out.append(math.copysign(min(rebuilt, top), float(x)))
    return np.array(out, dtype=np.float64).reshape(values.shape)


@pytest.mark.parametrize("dtype", FP8)
def test_stochastic_round_matches_the_scalar_restatement(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(37, 19, generator=gen) * 3.0
    values[0, :5] = torch.tensor([0.0, -0.0, 1e-3, -2e-4, 300.0])  # zeros, subnormals, near the top
    got = stochastic_round(values, dtype, 1234)
    assert got.dtype == dtype
    draws = torch.rand(values.shape, dtype=torch.float16, generator=torch.Generator().manual_seed(1234))
    np.testing.assert_array_equal(got.float().numpy(), _scalar_reference(values, draws, dtype))


@pytest.mark.parametrize("dtype", FP8)
def test_stochastic_round_picks_a_neighbour_and_is_unbiased(dtype: torch.dtype) -> None:
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = torch.unique(grid[torch.isfinite(grid)])
    value = torch.full((200, 100), 0.3)
    got = stochastic_round(value, dtype, 7).float()
    below = grid[grid <= 0.3].max()
    above = grid[grid > 0.3].min()
    assert set(got.unique().tolist()) == {float(below), float(above)}
    assert float(got.mean()) == pytest.approx(0.3, rel=0.01)  # nearest rounding would be off by ~4 %
    assert torch.equal(stochastic_round(value, dtype, 7), stochastic_round(value, dtype, 7))
    assert not torch.equal(stochastic_round(value, dtype, 8), stochastic_round(value, dtype, 7))


@pytest.fixture
def unets() -> tuple[Any, Any]:
    """A small SD-shaped UNet with fp8 (e4m3fn) values marked as fp8 storage, and an unmarked twin."""
    twin = tiny_unet()
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(p.to(torch.float8_e4m3fn).float())  # UNETLoader fp8: rounded at load
    fp8 = copy.deepcopy(twin)
    mark_storage(fp8, torch.float8_e4m3fn)
    return fp8, twin


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def test_a_lora_on_an_fp8_unet_is_rounded_back_as_comfyui_rounds_it(
    unets: tuple[Any, Any], tmp_path: Path
) -> None:
    fp8, twin = unets
    assert storage_dtype(fp8) == torch.float8_e4m3fn and storage_dtype(twin) is None
    path = write(tmp_path / "l.safetensors", kohya(twin, twin, [Q, CONV], [], 4, 4.0, torch.float32))
    before = {n: p.detach().clone() for n, p in fp8.named_parameters()}
    refs = [LoraRef(path, file_stamp(path), 0.8, "l")]
    assert apply_stack(fp8, refs, "unet") == 2 and apply_stack(twin, refs, "unet") == 2
    got, fp32_sum = dict(fp8.named_parameters()), dict(twin.named_parameters())
    # ComfyUI's keys for these two weights (the LDM layout: input block 1 holds level 0's first
    # resnet and transformer)
    keys = {
        Q + ".weight": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        CONV + ".weight": "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    }
    for name, key in keys.items():
        want = stochastic_round(fp32_sum[name].detach(), torch.float8_e4m3fn, key_seed(key)).float()
        assert torch.equal(got[name], want), name
        assert not torch.equal(got[name], fp32_sum[name].to(torch.float8_e4m3fn).float())  # not nearest
    untouched = [n for n in before if n not in keys and not torch.equal(got[n], before[n])]
    assert not untouched
    # a strength change is rebuilt and rounded, never a runtime branch over the unrounded sum
    apply_stack(fp8, [LoraRef(path, file_stamp(path), 0.5, "l")], "unet")
    assert branched(fp8) == 0
    assert torch.equal(got[Q + ".weight"], got[Q + ".weight"].to(torch.float8_e4m3fn).float())
    restore(fp8)
    assert all(torch.equal(p, before[n]) for n, p in fp8.named_parameters())
