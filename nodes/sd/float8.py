"""fp8 weight storage (UNETLoader's `weight_dtype` fp8_e4m3fn / fp8_e5m2): which modules hold fp8
values, and how a patched weight goes back to fp8.

ComfyUI keeps such a UNet in fp8. A LoRA or a merge is applied to each weight in fp32 and the sum
is rounded back to fp8 *stochastically* (comfy/model_patcher.py `patch_weight_to_device` ->
comfy/float.py `stochastic_rounding`), with a generator seeded by the CRC-32 of the weight's key
(`comfy.utils.string_to_seed("diffusion_model.input_blocks.1.1.proj_in.weight")`). Here the UNet
keeps fp32 storage of the fp8 values, and the patcher rounds each patched weight the same way, with
the same draws, so a LoRA'd fp8 model computes with ComfyUI's weights. Written by hand: no library
reproduces that rounding.

The draws come from a CPU generator, as ComfyUI's do on a CPU; ComfyUI on a GPU draws from a CUDA
generator, which gives other numbers (both are unbiased; neither is "more right").
"""

from __future__ import annotations

import weakref
import zlib
from typing import Any

import torch

# dtype -> (exponent bits, mantissa bits, exponent bias)
FORMATS: dict[torch.dtype, tuple[int, int, int]] = {
    torch.float8_e4m3fn: (4, 3, 7),
    torch.float8_e5m2: (5, 2, 15),
}
_SLICE = 4096 * 4096  # elements per slice of a large weight (ComfyUI's)

_STORAGE: weakref.WeakKeyDictionary[Any, torch.dtype] = weakref.WeakKeyDictionary()


def mark_storage(module: Any, dtype: torch.dtype) -> None:
    """Record that `module`'s weights hold `dtype` (an fp8 format) values."""
    if dtype not in FORMATS:
        raise ValueError(f"{dtype} is not an fp8 storage format")
    _STORAGE[module] = dtype


def storage_dtype(module: Any) -> torch.dtype | None:
    """The fp8 format `module`'s weights hold, or None for ordinary (fp32/fp16) storage."""
    return _STORAGE.get(module)


def key_seed(key: str) -> int:
    """comfy.utils.string_to_seed: the CRC-32 (reflected polynomial 0xEDB88320, initial and final
    xor 0xFFFFFFFF) of the key's characters; state-dict keys are ASCII, so zlib's CRC-32 of the bytes."""
    return zlib.crc32(key.encode("ascii"))


def stochastic_round(value: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """`value` rounded to the fp8 `dtype` up or down at random, in proportion to its distance from
    the two neighbours, with ComfyUI's draws: one generator seeded with `seed`, consumed slice by
    slice of rows (one slice below 4096² elements)."""
    generator = torch.Generator(device=value.device)
    generator.manual_seed(seed)
    out = torch.empty_like(value, dtype=dtype)
    slices = max(1, value.numel() / _SLICE)
    rows = max(1, round(value.shape[0] / slices))
    for start in range(0, value.shape[0], rows):
        out[start : start + rows].copy_(_round_slice(value[start : start + rows], dtype, generator))
    return out


def _round_slice(value: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """comfy.float.manual_stochastic_round_to_float8, step for step (every step in fp16, as there).

    1. Go to fp16; keep the sign (0 for zeros) and work on magnitudes.
    2. The fp8 exponent of each magnitude: ⌊log2 |x|⌋ + bias, clamped to the format's range
       (0 marks a subnormal).
    3. The mantissa in units of the fp8 mantissa's last place: (|x|/2^(e−bias) − 1)·2^m for
       normals, |x|/2^(1−bias−m) for subnormals.
    4. Add a uniform draw in [0, 1) and floor: rounds up with probability equal to the fraction.
    5. Rebuild the value from sign, exponent and rounded mantissa; clamp to the format's range.
    """
    exponent_bits, mantissa_bits, bias = FORMATS[dtype]
    x = value.half()  # 1.
    sign = torch.sign(x)
    magnitude = x.abs()
    sign = torch.where(magnitude == 0, 0, sign)
    exponent = torch.clamp(torch.floor(torch.log2(magnitude)) + bias, 0, 2**exponent_bits - 1)  # 2.
    normal = ~(exponent == 0)
    scaled = torch.where(  # 3.
        normal,
        (magnitude / (2.0 ** (exponent - bias)) - 1.0) * (2**mantissa_bits),
        magnitude / (2.0 ** (-bias + 1 - mantissa_bits)),
    )
    scaled += torch.rand(scaled.size(), dtype=scaled.dtype, device=scaled.device, generator=generator)  # 4.
    mantissa = scaled.floor() / (2**mantissa_bits)
    sign *= torch.where(  # 5.
        normal,
        (2.0 ** (exponent - bias)) * (1.0 + mantissa),
        (2.0 ** (-bias + 1)) * mantissa,
    )
    limits = torch.finfo(dtype)
    torch.clamp(sign, min=limits.min, max=limits.max, out=sign)
    return sign
