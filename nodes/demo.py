"""Small random-weight demo models, so `nodegraph run` works on a machine without any download.

`write_demo_models` writes an SD1.5-shaped original-LDM checkpoint (a 2-level UNet, the full CLIP-L
text encoder and the full SD VAE, fp16) and two kohya LoRAs. The weights are random: the images
they make are noise. They exist to exercise every node end to end, not to draw anything.

Each tensor is drawn from its own generator seeded by sha256 of its key, so the files are the
same on every machine and a tensor does not depend on which others exist. The same writer makes
the full-size SD1.5 layout the checkpoint benchmark loads (`UNET_FULL`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodegraph.folders import Folders

CHECKPOINT_NAME = "nodegraph_demo_sd15.safetensors"
INPUT_IMAGE_NAME = "nodegraph_demo.png"  # the img2img example's input
LORA_NAMES = ("nodegraph_demo_lora_a.safetensors", "nodegraph_demo_lora_b.safetensors")


@dataclass(frozen=True)
class UNetShape:
    """A UNet in LDM terms: channel multipliers, res blocks per level, transformer depth per level;
    SD1.x by default, SDXL's with a label embedding (`adm` > 0) and linear transformer projections."""

    channel_mult: tuple[int, ...]
    num_res_blocks: int
    depth: tuple[int, ...]
    mid_depth: int = 1
    model_channels: int = 320
    context_dim: int = 768
    adm: int = 0  # width of the label embedding's input (SDXL's pooled text + size sinusoids); 0: none
    linear_proj: bool = False  # SpatialTransformer proj_in/proj_out as Linear (SDXL), not 1x1 conv


UNET_MINI = UNetShape(channel_mult=(1, 2), num_res_blocks=1, depth=(1, 0))  # the oracle's mini config
UNET_FULL = UNetShape(channel_mult=(1, 2, 4, 4), num_res_blocks=2, depth=(1, 1, 1, 0))  # real SD1.5

# (key, shape, kind, fan_in): kind w = weight (std 1/sqrt(fan_in)), b = bias, n = norm weight, e = embedding
Spec = tuple[str, tuple[int, ...], str, int]


def _linear(p: str, fin: int, fout: int, bias: bool = True) -> Iterator[Spec]:
    yield (f"{p}.weight", (fout, fin), "w", fin)
    if bias:
        yield (f"{p}.bias", (fout,), "b", 0)


def _conv(p: str, cin: int, cout: int, k: int) -> Iterator[Spec]:
    yield (f"{p}.weight", (cout, cin, k, k), "w", cin * k * k)
    yield (f"{p}.bias", (cout,), "b", 0)


def _norm(p: str, c: int) -> Iterator[Spec]:
    yield (f"{p}.weight", (c,), "n", 0)
    yield (f"{p}.bias", (c,), "b", 0)


def _resblock(p: str, cin: int, cout: int, temb: int) -> Iterator[Spec]:
    yield from _norm(f"{p}in_layers.0", cin)
    yield from _conv(f"{p}in_layers.2", cin, cout, 3)
    yield from _linear(f"{p}emb_layers.1", temb, cout)
    yield from _norm(f"{p}out_layers.0", cout)
    yield from _conv(f"{p}out_layers.3", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{p}skip_connection", cin, cout, 1)


def _proj(p: str, ch: int, linear: bool) -> Iterator[Spec]:
    yield from _linear(p, ch, ch) if linear else _conv(p, ch, ch, 1)


def _transformer(p: str, ch: int, depth: int, ctx: int, linear_proj: bool) -> Iterator[Spec]:
    yield from _norm(f"{p}norm", ch)
    yield from _proj(f"{p}proj_in", ch, linear_proj)
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
    yield from _proj(f"{p}proj_out", ch, linear_proj)


def unet_specs(shape: UNetShape, prefix: str = "model.diffusion_model.") -> Iterator[Spec]:
    """The LDM (openaimodel) keys and shapes of an SD1.x or SDXL-family UNet."""
    mc, temb, ctx, lin = shape.model_channels, shape.model_channels * 4, shape.context_dim, shape.linear_proj
    yield from _linear(f"{prefix}time_embed.0", mc, temb)
    yield from _linear(f"{prefix}time_embed.2", temb, temb)
    if shape.adm:
        yield from _linear(f"{prefix}label_emb.0.0", shape.adm, temb)
        yield from _linear(f"{prefix}label_emb.0.2", temb, temb)
    yield from _conv(f"{prefix}input_blocks.0.0", 4, mc, 3)
    skips, ch, idx = [mc], mc, 1
    for level, mult in enumerate(shape.channel_mult):
        for _ in range(shape.num_res_blocks):
            yield from _resblock(f"{prefix}input_blocks.{idx}.0.", ch, mult * mc, temb)
            ch = mult * mc
            if shape.depth[level]:
                yield from _transformer(f"{prefix}input_blocks.{idx}.1.", ch, shape.depth[level], ctx, lin)
            skips.append(ch)
            idx += 1
        if level != len(shape.channel_mult) - 1:
            yield from _conv(f"{prefix}input_blocks.{idx}.0.op", ch, ch, 3)
            skips.append(ch)
            idx += 1
    yield from _resblock(f"{prefix}middle_block.0.", ch, ch, temb)
    yield from _transformer(f"{prefix}middle_block.1.", ch, shape.mid_depth, ctx, lin)
    yield from _resblock(f"{prefix}middle_block.2.", ch, ch, temb)
    idx = 0
    for level in reversed(range(len(shape.channel_mult))):
        out = shape.channel_mult[level] * mc
        for i in range(shape.num_res_blocks + 1):
            p = f"{prefix}output_blocks.{idx}."
            yield from _resblock(f"{p}0.", ch + skips.pop(), out, temb)
            ch, sub = out, 1
            if shape.depth[level]:
                yield from _transformer(f"{p}1.", ch, shape.depth[level], ctx, lin)
                sub = 2
            if level and i == shape.num_res_blocks:
                yield from _conv(f"{p}{sub}.conv", ch, ch, 3)
            idx += 1
    yield from _norm(f"{prefix}out.0", mc)
    yield from _conv(f"{prefix}out.2", mc, 4, 3)


def _vae_resblock(p: str, cin: int, cout: int) -> Iterator[Spec]:
    yield from _norm(f"{p}.norm1", cin)
    yield from _conv(f"{p}.conv1", cin, cout, 3)
    yield from _norm(f"{p}.norm2", cout)
    yield from _conv(f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{p}.nin_shortcut", cin, cout, 1)


def _vae_mid(p: str, ch: int) -> Iterator[Spec]:
    yield from _vae_resblock(f"{p}.mid.block_1", ch, ch)
    yield from _norm(f"{p}.mid.attn_1.norm", ch)
    for name in ("q", "k", "v", "proj_out"):
        yield from _conv(f"{p}.mid.attn_1.{name}", ch, ch, 1)
    yield from _vae_resblock(f"{p}.mid.block_2", ch, ch)


def vae_specs(prefix: str = "first_stage_model.", z: int = 4) -> Iterator[Spec]:
    """The LDM keys and shapes of the standard SD VAE (ch 128, ch_mult 1,2,4,4, 2 res blocks)."""
    chans = [128 * m for m in (1, 2, 4, 4)]
    yield from _conv(f"{prefix}encoder.conv_in", 3, 128, 3)
    ch = 128
    for i, out in enumerate(chans):
        for j in range(2):
            yield from _vae_resblock(f"{prefix}encoder.down.{i}.block.{j}", ch, out)
            ch = out
        if i != len(chans) - 1:
            yield from _conv(f"{prefix}encoder.down.{i}.downsample.conv", ch, ch, 3)
    yield from _vae_mid(f"{prefix}encoder", ch)
    yield from _norm(f"{prefix}encoder.norm_out", ch)
    yield from _conv(f"{prefix}encoder.conv_out", ch, 2 * z, 3)
    yield from _conv(f"{prefix}quant_conv", 2 * z, 2 * z, 1)
    yield from _conv(f"{prefix}post_quant_conv", z, z, 1)
    yield from _conv(f"{prefix}decoder.conv_in", z, chans[-1], 3)
    ch = chans[-1]
    yield from _vae_mid(f"{prefix}decoder", ch)
    for i in reversed(range(len(chans))):
        for j in range(3):
            yield from _vae_resblock(f"{prefix}decoder.up.{i}.block.{j}", ch, chans[i])
            ch = chans[i]
        if i:
            yield from _conv(f"{prefix}decoder.up.{i}.upsample.conv", ch, ch, 3)
    yield from _norm(f"{prefix}decoder.norm_out", ch)
    yield from _conv(f"{prefix}decoder.conv_out", ch, 3, 3)


def clip_specs(prefix: str = "cond_stage_model.transformer.text_model.", layers: int = 12) -> Iterator[Spec]:
    """The CLIP-L text tower (width 768; 12 layers, or fewer) under HF names."""
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


def random_tensor(seed: str, key: str, shape: tuple[int, ...], kind: str, fan_in: int) -> np.ndarray:
    """A deterministic fp16 tensor: uniform with the std its kind calls for (weights 1/sqrt(fan_in))."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    std = {"w": 1.0 / np.sqrt(max(fan_in, 1)), "b": 0.05, "n": 0.1, "e": 0.5}[kind]
    values = (rng.random(int(np.prod(shape)), dtype=np.float32) * 2.0 - 1.0) * np.float32(std * np.sqrt(3.0))
    if kind == "n":
        values += 1.0
    return values.reshape(shape).astype(np.float16)


def save_tensors(tensors: dict[str, np.ndarray], path: Path, meta: dict[str, str]) -> Path:
    """Write a safetensors file atomically (a `.partial` renamed into place): an interrupted write
    leaves no truncated file that `write_demo_models` would then skip as present."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=meta)
    partial.replace(path)
    return path


def write_checkpoint(path: Path, unet: UNetShape = UNET_MINI, seed: str = "nodegraph-demo") -> Path:
    """Write an SD1.x LDM single-file checkpoint with random fp16 weights."""
    specs = [*unet_specs(unet), *vae_specs(), *clip_specs()]
    tensors = {key: random_tensor(seed, key, shape, kind, fan) for key, shape, kind, fan in specs}
    meta = {"nodegraph_demo": "random weights: the images this model makes are noise"}
    return save_tensors(tensors, path, meta)


def lora_tensors(
    seed: str, targets: Iterable[tuple[str, int, int]], rank: int, alpha: float
) -> dict[str, np.ndarray]:
    """A kohya LoRA's random fp16 tensors: per (module name, in features, out features), lora_down,
    lora_up (at half the usual weight std) and alpha."""
    tensors: dict[str, np.ndarray] = {}
    for name, fin, fout in targets:
        tensors[f"{name}.lora_down.weight"] = random_tensor(seed, f"{name}.down", (rank, fin), "w", fin)
        up = random_tensor(seed, f"{name}.up", (fout, rank), "w", rank)
        tensors[f"{name}.lora_up.weight"] = (up.astype(np.float32) * 0.5).astype(np.float16)
        tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float16)
    return tensors


def _lora_targets(which: str) -> list[tuple[str, int, int]]:
    """(kohya module name, in features, out features) for the demo LoRAs, from the mini UNet."""
    out: list[tuple[str, int, int]] = []
    blocks = ("down_blocks_0_attentions_0", "mid_block_attentions_0", "up_blocks_1_attentions_0")
    for b, ch in zip(blocks, (320, 640, 320), strict=True):
        tb = f"lora_unet_{b}_transformer_blocks_0"
        names = ["attn1_to_q", "attn1_to_v", "attn2_to_q", "attn2_to_out_0"]
        if which == "a":
            names += ["attn1_to_k", "attn1_to_out_0", "ff_net_2"]
        out += [(f"{tb}_{n}", ch * 4 if n == "ff_net_2" else ch, ch) for n in names]
        out.append((f"lora_unet_{b}_proj_in", ch, ch))
    layers = range(12) if which == "a" else range(6)
    for n in layers:
        for proj in ("self_attn_q_proj", "self_attn_v_proj", "mlp_fc1"):
            fout = 3072 if proj == "mlp_fc1" else 768
            out.append((f"lora_te_text_model_encoder_layers_{n}_{proj}", 768, fout))
    return out


def write_lora(path: Path, which: str, rank: int, alpha: float) -> Path:
    """A kohya-format LoRA with random fp16 weights and kohya's training metadata."""
    tensors = lora_tensors(f"nodegraph-demo-lora-{which}", _lora_targets(which), rank, alpha)
    tags = {"demo": {"random": 3, "noise": 2, f"lora {which}": 1}}
    meta = {
        "ss_output_name": path.stem,
        "ss_tag_frequency": json.dumps(tags),
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "nodegraph_demo": "random weights",
    }
    return save_tensors(tensors, path, meta)


def write_input_image(path: Path, size: int = 256) -> Path:
    """A colour gradient with a disc: a visible input for the img2img example."""
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    y, x = np.meshgrid(ramp, ramp, indexing="ij")
    disc = ((x - 128) ** 2 + (y - 110) ** 2 < 60**2) * 120.0
    rgb = np.stack([x, y, np.clip(255 - x + disc, 0, 255)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def write_demo_models(folders: Folders, force: bool = False, sdxl: bool = False) -> list[Path]:
    """Write the demo checkpoint, LoRAs and input image; skip files that exist unless `force`.

    Args:
        folders: where to write (the first `checkpoints` and `loras` directories, the input folder).
        force: rewrite files that already exist.
        sdxl: also write the SDXL-family demo checkpoint, a mini SDXL refiner and two SDXL LoRAs
            (nodes/demo_sdxl.py).

    Returns:
        The paths written (empty when everything was already there).
    """
    ckpt = folders.paths("checkpoints")[0] / CHECKPOINT_NAME
    loras = folders.paths("loras")[0]
    jobs: list[tuple[Path, Callable[[Path], Path]]] = [
        (ckpt, lambda p: write_checkpoint(p)),
        (loras / LORA_NAMES[0], lambda p: write_lora(p, "a", rank=4, alpha=4.0)),
        (loras / LORA_NAMES[1], lambda p: write_lora(p, "b", rank=8, alpha=4.0)),
        (folders.input_dir / INPUT_IMAGE_NAME, write_input_image),
    ]
    if sdxl:
        from nodes import demo_sdxl

        jobs += [
            (ckpt.with_name(demo_sdxl.SDXL_DEMO_NAME), demo_sdxl.write_sdxl_checkpoint),
            (
                ckpt.with_name(demo_sdxl.REFINER_DEMO_NAME),
                lambda p: demo_sdxl.write_sdxl_checkpoint(
                    p, demo_sdxl.REFINER_MINI, "nodegraph-demo-refiner"
                ),
            ),
            (loras / demo_sdxl.SDXL_LORA_NAMES[0], lambda p: demo_sdxl.write_sdxl_lora(p, "a", 4, 4.0)),
            (loras / demo_sdxl.SDXL_LORA_NAMES[1], lambda p: demo_sdxl.write_sdxl_lora(p, "b", 8, 4.0)),
        ]
    written = []
    for path, write in jobs:
        if path.exists() and not force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(write(path))
    if written:
        print("nodegraph demo: wrote RANDOM-WEIGHT models (their images are noise; they exercise the nodes):")
        for path in written:
            print(f"  {path}")
    return written
