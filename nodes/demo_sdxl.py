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

from nodes.demo import Spec, _conv, _linear, _norm, _resblock, random_tensor, vae_specs

# The demo UNet's SpatialTransformers (SGM names, as kohya's sdxl_train_network writes them) and widths.
_LORA_BLOCKS = (("input_blocks_3_1", 256), ("middle_block_1", 256), ("output_blocks_0_1", 256))

SDXL_DEMO_NAME = "nodegraph_demo_sdxl.safetensors"
REFINER_DEMO_NAME = "nodegraph_demo_sdxl_refiner.safetensors"
SDXL_LORA_NAMES = ("nodegraph_demo_sdxl_lora_a.safetensors", "nodegraph_demo_sdxl_lora_b.safetensors")
CLIP_L = "conditioner.embedders.0.transformer.text_model."
G_BASE = "conditioner.embedders.1.model."
G_REFINER = "conditioner.embedders.0.model."


@dataclass(frozen=True)
class SdxlShape:
    """An SDXL-family UNet and text encoders, in LDM terms."""

    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    depth: tuple[int, ...] = (0, 1)  # transformer depth per level
    mid_depth: int = 1
    model_channels: int = 128  # heads are 64 channels wide
    context_dim: int = 2048
    adm: int = 2816
    clip_l_layers: int = 3  # 0 for the refiner
    clip_g_layers: int = 3
    g_prefix: str = G_BASE


SDXL_DEMO = SdxlShape()
REFINER_MINI = SdxlShape(
    channel_mult=(1, 2, 2), depth=(0, 1, 0), context_dim=1280, adm=2560, clip_l_layers=0, g_prefix=G_REFINER
)


def _transformer(p: str, ch: int, depth: int, ctx: int) -> Iterator[Spec]:
    yield from _norm(f"{p}norm", ch)
    yield from _linear(f"{p}proj_in", ch, ch)  # SDXL: Linear projections (use_linear_in_transformer)
    for d in range(depth):
        b = f"{p}transformer_blocks.{d}."
        for attn, kv_in in (("attn1", ch), ("attn2", ctx)):
            yield from _linear(f"{b}{attn}.to_q", ch, ch, bias=False)
            yield from _linear(f"{b}{attn}.to_k", kv_in, ch, bias=False)
            yield from _linear(f"{b}{attn}.to_v", kv_in, ch, bias=False)
            yield from _linear(f"{b}{attn}.to_out.0", ch, ch)
        yield from _linear(f"{b}ff.net.0.proj", ch, ch * 8)
        yield from _linear(f"{b}ff.net.2", ch * 4, ch)
        for n in (1, 2, 3):
            yield from _norm(f"{b}norm{n}", ch)
    yield from _linear(f"{p}proj_out", ch, ch)


def unet_specs(shape: SdxlShape, prefix: str = "model.diffusion_model.") -> Iterator[Spec]:
    """The LDM keys and shapes of an SDXL-family UNet (label embedding, linear projections)."""
    mc, temb, ctx = shape.model_channels, shape.model_channels * 4, shape.context_dim
    yield from _linear(f"{prefix}time_embed.0", mc, temb)
    yield from _linear(f"{prefix}time_embed.2", temb, temb)
    yield from _linear(f"{prefix}label_emb.0.0", shape.adm, temb)
    yield from _linear(f"{prefix}label_emb.0.2", temb, temb)
    yield from _conv(f"{prefix}input_blocks.0.0", 4, mc, 3)
    skips, ch, idx = [mc], mc, 1
    for level, mult in enumerate(shape.channel_mult):
        for _ in range(shape.num_res_blocks):
            yield from _resblock(f"{prefix}input_blocks.{idx}.0.", ch, mult * mc, temb)
            ch = mult * mc
            if shape.depth[level]:
                yield from _transformer(f"{prefix}input_blocks.{idx}.1.", ch, shape.depth[level], ctx)
            skips.append(ch)
            idx += 1
        if level != len(shape.channel_mult) - 1:
            yield from _conv(f"{prefix}input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
    yield from _resblock(f"{prefix}middle_block.0.", ch, ch, temb)
    yield from _transformer(f"{prefix}middle_block.1.", ch, shape.mid_depth, ctx)
    yield from _resblock(f"{prefix}middle_block.2.", ch, ch, temb)
    idx = 0
    for level in reversed(range(len(shape.channel_mult))):
        out = shape.channel_mult[level] * mc
        for i in range(shape.num_res_blocks + 1):
            p = f"{prefix}output_blocks.{idx}."
            yield from _resblock(f"{p}0.", ch + skips.pop(), out, temb)
            ch, sub = out, 1
            if shape.depth[level]:
                yield from _transformer(f"{p}1.", ch, shape.depth[level], ctx)
                sub = 2
            if level and i == shape.num_res_blocks:
                yield from _conv(f"{p}{sub}.conv", ch, ch, 3)
            idx += 1
    yield from _norm(f"{prefix}out.0", mc)
    yield from _conv(f"{prefix}out.2", mc, 4, 3)


def clip_l_specs(layers: int, prefix: str = CLIP_L) -> Iterator[Spec]:
    """CLIP-L (width 768) under HF names, `layers` deep."""
    width = 768
    yield (f"{prefix}embeddings.token_embedding.weight", (49408, width), "e", 0)
    yield (f"{prefix}embeddings.position_embedding.weight", (77, width), "e", 0)
    for n in range(layers):
        p = f"{prefix}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _linear(f"{p}self_attn.{proj}", width, width)
        yield from _norm(f"{p}layer_norm1", width)
        yield from _linear(f"{p}mlp.fc1", width, 4 * width)
        yield from _linear(f"{p}mlp.fc2", 4 * width, width)
        yield from _norm(f"{p}layer_norm2", width)
    yield from _norm(f"{prefix}final_layer_norm", width)


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
    from safetensors.numpy import save_file

    specs = [*unet_specs(shape), *vae_specs(), *clip_g_specs(shape.clip_g_layers, shape.g_prefix)]
    if shape.clip_l_layers:
        specs += list(clip_l_specs(shape.clip_l_layers))
    tensors = {key: random_tensor(seed, key, shape_, kind, fan) for key, shape_, kind, fan in specs}
    tensors[f"{shape.g_prefix}logit_scale"] = np.array(np.log(100.0), dtype=np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = "SDXL refiner" if shape.adm == 2560 else "SDXL"
    meta = {"nodegraph_demo": f"random weights ({kind}-shaped): the images this model makes are noise"}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    partial.replace(path)
    return path


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
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    seed = f"nodegraph-demo-sdxl-lora-{which}"
    for name, fin, fout in _sdxl_lora_targets(which):
        tensors[f"{name}.lora_down.weight"] = random_tensor(seed, f"{name}.down", (rank, fin), "w", fin)
        up = random_tensor(seed, f"{name}.up", (fout, rank), "w", rank)
        tensors[f"{name}.lora_up.weight"] = (up.astype(np.float32) * 0.5).astype(np.float16)
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float16)
    meta = {
        "ss_output_name": path.stem,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "nodegraph_demo": "random weights (SDXL LoRA): what it changes is noise",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    partial.replace(path)
    return path
