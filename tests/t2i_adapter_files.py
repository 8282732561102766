"""Small random-weight T2I-Adapter files in the layouts people download, and an SD1.5-shaped small UNet
they fit.

Layouts (the keys ComfyUI's `load_t2i_adapter` reads, comfy/controlnet.py):

* full, TencentARC's SD1.x files (`t2iadapter_canny_sd14v1.pth` ...): `conv_in` (64 or 192 inputs:
  1 or 3 hint channels x 8 x 8), `body.0-7.block1` (3x3) / `block2` (1x1), `in_conv` (1x1) where the
  width changes; widths c, 2c, 4c, 4c (c = 320 in the real files);
* light (`t2iadapter_*_sd14v1` light / `coadapter`-era files): `body.N.in_conv`, `body.N.body.K.block1/2`,
  `body.N.out_conv` per level;
* SDXL (TencentARC's `t2i-adapter-*-sdxl-1.0`, as ComfyUI reads them): `conv_in` with 256 or 768 inputs
  (x 16 x 16), widths c, 2c, 4c, 4c, level 1 widening without a downsample;
* diffusers (`diffusion_pytorch_model.safetensors` of a diffusers T2IAdapter folder):
  `adapter.conv_in`, `adapter.body.I.in_conv`, `adapter.body.I.resnets.J.block1/2`.

The widths here are small; the SD1 ones (c = 32) fit `write_sd15_shaped_unet`, a UNet with SD1.5's
block structure (4 levels of 2 layers: the features land after input blocks 2, 5, 8, 11) at widths
32/64/128/128, since the oracle's mini SD1.5 UNet (2 levels, 4 input blocks) takes none of an SD1
adapter's features, in ComfyUI as here. The SDXL one (c = 160) fits the mini SDXL UNet's input blocks
5 and 8 and its middle block (its first feature, 160 wide, meets 320: left out, as in ComfyUI).

Values: `nodes.demo.random_tensor` (a PCG64 stream per key from sha256, uniform, std 1/sqrt(fan_in)),
fp16, so a file is the same on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nodes.demo import UNetShape, random_tensor, unet_specs

GENERATOR_VERSION = "1"
Spec = tuple[str, tuple[int, ...], str, int]
SD15_SHAPED = UNetShape(channel_mult=(1, 2, 4, 4), num_res_blocks=2, depth=(1, 1, 1, 0), model_channels=32)


def _conv(name: str, cin: int, cout: int, k: int) -> Iterator[Spec]:
    yield (f"{name}.weight", (cout, cin, k, k), "w", cin * k * k)
    yield (f"{name}.bias", (cout,), "b", 0)


def full_specs(c: int, cin: int, ksize: int = 1, xl: bool = False, conv_down: bool = False) -> list[Spec]:
    """The original layout of a full adapter (ComfyUI's Adapter with nums_rb=2, sk=True)."""
    widths = (c, 2 * c, 4 * c, 4 * c)
    down_levels, widen_levels = ((2,), (1,)) if xl else ((1, 2, 3), ())
    specs = list(_conv("conv_in", cin, c, 3))
    for i, width in enumerate(widths):
        for j in range(2):
            n = 2 * i + j
            start = j == 0 and (i in down_levels or i in widen_levels)
            before = widths[i - 1] if start else width
            if start and i in down_levels and conv_down:
                specs += _conv(f"body.{n}.down_opt.op", before, before, 3)
            if before != width:
                specs += _conv(f"body.{n}.in_conv", before, width, ksize)
            specs += _conv(f"body.{n}.block1", width, width, 3)
            specs += _conv(f"body.{n}.block2", width, width, ksize)
    return specs


def light_specs(widths: tuple[int, ...], cin: int, blocks: int = 4) -> list[Spec]:
    """The original layout of a light adapter (ComfyUI's Adapter_light: extractors of `blocks` blocks)."""
    specs: list[Spec] = []
    before = cin
    for i, width in enumerate(widths):
        inner = width // 4
        specs += _conv(f"body.{i}.in_conv", before, inner, 1)
        for k in range(blocks):
            specs += _conv(f"body.{i}.body.{k}.block1", inner, inner, 3)
            specs += _conv(f"body.{i}.body.{k}.block2", inner, inner, 3)
        specs += _conv(f"body.{i}.out_conv", inner, width, 1)
        before = width
    return specs


def diffusers_name(key: str) -> str:
    """A full adapter's original key under diffusers' T2IAdapter names (ComfyUI's table, reversed)."""
    if not key.startswith("body."):
        return f"adapter.{key}"
    n, rest = key[len("body.") :].split(".", 1)
    level, j = divmod(int(n), 2)
    if rest.startswith("in_conv."):
        return f"adapter.body.{level}.{rest}"
    return f"adapter.body.{level}.resnets.{j}.{rest}"


def tensors(specs: list[Spec], seed: str) -> dict[str, np.ndarray]:
    return {key: random_tensor(seed, key, shape, kind, fan) for key, shape, kind, fan in specs}


def write(path: Path, specs: list[Spec], seed: str, diffusers: bool = False) -> Path:
    """Write the adapter of `specs` as .safetensors (diffusers' names when asked)."""
    from safetensors.numpy import save_file

    found = tensors(specs, seed)
    if diffusers:
        found = {diffusers_name(k): v for k, v in found.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(found, str(path))
    return path


def write_sd15_shaped_unet(path: Path, seed: str = "t2i-sd15-shaped") -> Path:
    """An SD1.x UNet alone (LDM names, no prefix: UNETLoader's file) with SD1.5's blocks, narrow."""
    from safetensors.numpy import save_file

    specs = list(unet_specs(SD15_SHAPED, prefix=""))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors(specs, seed), str(path))
    return path


# The files the tests use: name -> (specs, seed, diffusers layout)
FILES: dict[str, tuple[list[Spec], str, bool]] = {
    "t2iadapter_sketch_mini.safetensors": (full_specs(32, 64), "sketch", False),  # grey hint, 1x1 convs
    "t2iadapter_canny_mini_conv.safetensors": (full_specs(32, 192, 3, conv_down=True), "conv", False),
    "t2iadapter_light_mini.safetensors": (light_specs((32, 64, 128, 128), 192), "light", False),
    "t2i-adapter-mini-diffusers.safetensors": (full_specs(32, 64), "sketch", True),  # the sketch one
    "t2i-adapter-canny-sdxl-mini.safetensors": (full_specs(160, 768, xl=True), "xl", False),
}
