"""Small random-weight SDXL-family checkpoints: the `nodegraph demo --sdxl` model and a mini refiner.

Both are single SGM-layout files exactly like real ones, so they load through the code that loads a
downloaded SDXL file:

* base: `model.diffusion_model.*` (with `label_emb`, adm 2816, context 2048),
  `conditioner.embedders.0.transformer.text_model.*` (CLIP-L, HF names),
  `conditioner.embedders.1.model.*` (OpenCLIP bigG, open_clip names: fused `in_proj`,
  `text_projection`), `first_stage_model.*` (the SD VAE);
* refiner: `conditioner.embedders.0.model.*` bigG alone, adm 2560 (4 sizes + aesthetic score),
  context 1280, a last level without attention but a middle block with it (as the real refiner).

Text encoders keep their real widths (768 and 1280, fixed by SDXL's 2048 / 1280 contexts) but
fewer layers, and the UNets are small. The weights are random: the images are noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodes.demo import (
    Spec,
    UNetShape,
    _linear,
    _norm,
    clip_specs,
    lora_tensors,
    random_tensor,
    save_tensors,
    unet_specs,
    vae_specs,
)

# The demo UNet's SpatialTransformers (SGM names, as kohya's sdxl_train_network writes them) and widths.
_LORA_BLOCKS = (("input_blocks_3_1", 256), ("middle_block_1", 256), ("output_blocks_0_1", 256))

SDXL_DEMO_NAME = "nodegraph_demo_sdxl.safetensors"
REFINER_DEMO_NAME = "nodegraph_demo_sdxl_refiner.safetensors"
SDXL_LORA_NAMES = ("nodegraph_demo_sdxl_lora_a.safetensors", "nodegraph_demo_sdxl_lora_b.safetensors")
CLIP_L = "conditioner.embedders.0.transformer.text_model."
G_BASE = "conditioner.embedders.1.model."
G_REFINER = "conditioner.embedders.0.model."


@dataclass(frozen=True)
class SdxlShape(UNetShape):
    """An SDXL-family UNet (label embedding, linear projections) and its text encoders, in LDM terms."""

    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    depth: tuple[int, ...] = (0, 1)  # transformer depth per level
    model_channels: int = 128  # heads are 64 channels wide
    context_dim: int = 2048
    adm: int = 2816
    linear_proj: bool = True  # use_linear_in_transformer
    clip_l_layers: int = 3  # 0 for the refiner
    clip_g_layers: int = 3
    g_prefix: str = G_BASE


SDXL_DEMO = SdxlShape()
REFINER_MINI = SdxlShape(
    channel_mult=(1, 2, 2), depth=(0, 1, 0), context_dim=1280, adm=2560, clip_l_layers=0, g_prefix=G_REFINER
)


def clip_l_specs(layers: int, prefix: str = CLIP_L) -> Iterator[Spec]:
    """CLIP-L (width 768) under HF names, `layers` deep."""
    return clip_specs(prefix, layers)


def clip_g_specs(layers: int, prefix: str) -> Iterator[Spec]:
    """OpenCLIP bigG (width 1280) under open_clip names: fused in_proj, x @ text_projection."""
    width = 1280
    yield (f"{prefix}token_embedding.weight", (49408, width), "e", 0)
    yield (f"{prefix}positional_embedding", (77, width), "e", 0)
    for n in range(layers):
        p = f"{prefix}transformer.resblocks.{n}."
        yield from _norm(f"{p}ln_1", width)
        yield (f"{p}attn.in_proj_weight", (3 * width, width), "w", width)
        yield (f"{p}attn.in_proj_bias", (3 * width,), "b", 0)
        yield from _linear(f"{p}attn.out_proj", width, width)
        yield from _norm(f"{p}ln_2", width)
        yield from _linear(f"{p}mlp.c_fc", width, 4 * width)
        yield from _linear(f"{p}mlp.c_proj", 4 * width, width)
    yield from _norm(f"{prefix}ln_final", width)
    yield (f"{prefix}text_projection", (width, width), "w", width)


def write_sdxl_checkpoint(
    path: Path, shape: SdxlShape = SDXL_DEMO, seed: str = "nodegraph-demo-sdxl"
) -> Path:
    """Write an SDXL-family SGM single-file checkpoint with random fp16 weights (atomically)."""
    specs = [*unet_specs(shape), *vae_specs(), *clip_g_specs(shape.clip_g_layers, shape.g_prefix)]
    if shape.clip_l_layers:
        specs += list(clip_l_specs(shape.clip_l_layers))
    tensors = {key: random_tensor(seed, key, shape_, kind, fan) for key, shape_, kind, fan in specs}
    tensors[f"{shape.g_prefix}logit_scale"] = np.array(np.log(100.0), dtype=np.float16)
    kind = "SDXL refiner" if shape.adm == 2560 else "SDXL"
    meta = {"nodegraph_demo": f"random weights ({kind}-shaped): the images this model makes are noise"}
    return save_tensors(tensors, path, meta)


def _sdxl_lora_targets(which: str) -> list[tuple[str, int, int]]:
    """(kohya module name, in features, out features) of a demo SDXL LoRA, on the demo model's shapes."""
    out: list[tuple[str, int, int]] = []
    for block, ch in _LORA_BLOCKS:
        prefix = f"lora_unet_{block}_transformer_blocks_0_"
        names = ["attn1_to_q", "attn1_to_v", "attn2_to_q", "attn2_to_k", "attn2_to_out_0"]
        if which == "a":
            names += ["attn1_to_k", "ff_net_2"]
        for name in names:
            fin = {"attn2_to_k": SDXL_DEMO.context_dim, "ff_net_2": ch * 4}.get(name, ch)
            out.append((prefix + name, fin, ch))
        out.append((f"lora_unet_{block}_proj_in", ch, ch))
    for te, width, layers in (("te1", 768, SDXL_DEMO.clip_l_layers), ("te2", 1280, SDXL_DEMO.clip_g_layers)):
        for n in range(layers if which == "a" else 1):
            for proj, fout in (
                ("self_attn_q_proj", width),
                ("self_attn_v_proj", width),
                ("mlp_fc1", 4 * width),
            ):
                out.append((f"lora_{te}_text_model_encoder_layers_{n}_{proj}", width, fout))
    return out


def write_sdxl_lora(path: Path, which: str, rank: int, alpha: float) -> Path:
    """A kohya `sdxl_train_network`-format LoRA for the SDXL demo model (random fp16 weights), atomically."""
    tensors = lora_tensors(f"nodegraph-demo-sdxl-lora-{which}", _sdxl_lora_targets(which), rank, alpha)
    meta = {
        "ss_output_name": path.stem,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "nodegraph_demo": "random weights (SDXL LoRA): what it changes is noise",
    }
    return save_tensors(tensors, path, meta)
