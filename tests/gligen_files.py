"""A small random-weight GLIGEN file shaped for a checkpoint's UNet, in the public files' layout.

ComfyUI's GLIGEN files (comfyanonymous/GLIGEN_pruned_safetensors, gligen_sd14_textbox_pruned) hold
`position_net.*` (the box encoder: pooled text 768 + 64 Fourier features -> 512 -> 512 -> 768) and
one gated self-attention layer per SpatialTransformer of the SD1.x UNet,
`<input_blocks|middle_block|output_blocks>.<n>.<k>.transformer_blocks.0.fuser.*` (linear, attn.to_q/k/v,
attn.to_out.0, ff.net.0.proj, ff.net.2, norm1, norm2, alpha_attn, alpha_dense). This writes that
layout for whichever transformers the given checkpoint has (the mini SD1.5: input_blocks.1.1,
middle_block.1, output_blocks.2.1 and .3.1), read from its header, so the file loads through exactly
the loader a real one uses.

Weights follow the oracle's mini generators (tests/oracle/make_mini_sd15.py: one PCG64 stream per
tensor from sha256("seed:key"), uniform, std gain/sqrt(fan_in), fp16); the gates alpha_attn and
alpha_dense are set (real GLIGEN training opens them from 0; 0 closes a gate exactly).

Usage (from the repository root): python -m tests.gligen_files OUT.safetensors CHECKPOINT.safetensors
[--seed gligen0]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from tests.conftest import oracle_module

GENERATOR_VERSION = "1"
UNET = "model.diffusion_model."
_TRANSFORMER = re.compile(
    r"^model\.diffusion_model\.((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)"
    r"\.transformer_blocks\.0\.attn2\.to_k\.weight$"
)
POSITION_HIDDEN = 512
FOURIER_FEATURES = 8 * 2 * 4  # 8 frequencies, sin and cos, four box coordinates


def transformers_of(checkpoint: Path) -> list[tuple[str, int, int]]:
    """(LDM block, width, text width) of every SpatialTransformer in the checkpoint's UNet."""
    found = []
    with safe_open(str(checkpoint), framework="np") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            match = _TRANSFORMER.match(key)
            if match:
                width, text = f.get_slice(key).get_shape()
                found.append((match.group(1), int(width), int(text)))
    return found


def gligen_specs(transformers: list[tuple[str, int, int]]) -> list[Any]:
    """(key, shape, kind, fan_in, gain) of every tensor but the two gates of each layer."""
    m = oracle_module("make_mini_sd15")
    s = m.Specs()
    text = transformers[0][2]
    for block, width, context in transformers:
        p = f"{block}.transformer_blocks.0.fuser."
        s.linear(p + "linear", context, width)
        for name in ("to_q", "to_k", "to_v"):
            s.linear(p + "attn." + name, width, width, bias=False)
        s.linear(p + "attn.to_out.0", width, width)
        s.linear(p + "ff.net.0.proj", width, 8 * width)  # GEGLU: 2 x 4·width
        s.linear(p + "ff.net.2", 4 * width, width)
        s.norm(p + "norm1", width)
        s.norm(p + "norm2", width)
    s.linear("position_net.linears.0", text + FOURIER_FEATURES, POSITION_HIDDEN)
    s.linear("position_net.linears.2", POSITION_HIDDEN, POSITION_HIDDEN)
    s.linear("position_net.linears.4", POSITION_HIDDEN, text)
    s.add("position_net.null_positive_feature", (text,), "emb", None, 0.5)
    s.add("position_net.null_position_feature", (FOURIER_FEATURES,), "emb", None, 0.5)
    return list(s.items)


def write_mini_gligen(
    out: Path,
    checkpoint: Path,
    seed: str = "gligen0",
    alphas: tuple[float, float] = (0.5, 0.5),
    prefix: str = "",
) -> Path:
    """Write the GLIGEN file for `checkpoint`'s UNet; `alphas` are (alpha_attn, alpha_dense) of every
    layer, `prefix` goes before the layers' keys (ComfyUI finds them by substring either way)."""
    m = oracle_module("make_mini_sd15")
    transformers = transformers_of(checkpoint)
    if not transformers:
        raise ValueError(f"{checkpoint.name} has no SD UNet transformers ({UNET}*attn2)")
    tensors = {spec[0]: m.make_tensor(seed, spec, "fp16") for spec in gligen_specs(transformers)}
    for block, _, _ in transformers:
        p = f"{block}.transformer_blocks.0.fuser."
        tensors[p + "alpha_attn"] = np.array(alphas[0], dtype=np.float16)
        tensors[p + "alpha_dense"] = np.array(alphas[1], dtype=np.float16)
    # the values depend on the unprefixed key: both layouts hold the same layers
    tensors = {(k if k.startswith("position_net.") else prefix + k): v for k, v in tensors.items()}
    meta = {"generator": "tests/gligen_files.py", "generator_version": GENERATOR_VERSION, "seed": seed}
    out.parent.mkdir(parents=True, exist_ok=True)
    m.save_safetensors(str(out), tensors, meta)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--seed", default="gligen0")
    args = parser.parse_args(argv)
    write_mini_gligen(args.out, args.checkpoint, args.seed)


if __name__ == "__main__":
    main()
