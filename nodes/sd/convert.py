"""From an original-LDM single-file checkpoint's key names and shapes to diffusers/transformers configs
and parameter names, without reading a single weight.

The renaming itself is diffusers' (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`): we
call it on a dict of *key references* instead of tensors, so what comes back is a map
`diffusers name -> LDM key` and the weights are read later, one tensor at a time, from the mapped
file. The configs are built here because diffusers builds them from an original yaml config (which
a bare .safetensors does not carry) and assumes the standard depths; ComfyUI instead infers depth
from the keys (`comfy/model_detection.py`), and so do we.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
SD1_VAE_BLOCKS = (128, 256, 512, 512)

Shape = tuple[int, ...]
ShapeOf = Callable[[str], Shape]


class UnsupportedCheckpointError(ValueError):
    """The file is a model nodegraph cannot load as an SD1.x checkpoint (SDXL, SD2, a LoRA ...)."""


@dataclass(frozen=True)
class _Ref:
    """Stands in for a tensor inside diffusers' converters: remembers which LDM key it came from."""

    key: str
    shape: Shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> _Ref:
        # The VAE converter squeezes 1x1 conv attention weights to linear ones (`w[:, :, 0, 0]`);
        # the loader reshapes to the parameter's shape, so only the shape needs tracking here.
        dropped = sum(1 for i in index if isinstance(i, int)) if isinstance(index, tuple) else 0
        return _Ref(self.key, self.shape[: len(self.shape) - dropped])


def detect_family(name: str, keys: Iterable[str], shape_of: ShapeOf) -> str:
    """ "sd15" for an SD1.x checkpoint, inpainting ones included; otherwise raise
    `UnsupportedCheckpointError` naming what it is."""
    keyset = set(keys)
    supported = "nodegraph supports SD1.x and SDXL-family checkpoints"
    if (
        any(k.startswith("conditioner.embedders.") for k in keyset)
        or f"{UNET_PREFIX}label_emb.0.0.weight" in keyset
    ):
        raise UnsupportedCheckpointError(f"'{name}' is an SDXL checkpoint; load it with load_checkpoint")
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in keyset:
        raise UnsupportedCheckpointError(
            f"'{name}' is not a Stable Diffusion checkpoint: {_what_is_it(keyset)}"
        )
    if any(k.startswith("cond_stage_model.model.") for k in keyset):
        raise UnsupportedCheckpointError(
            f"'{name}' is an SD2.x checkpoint (OpenCLIP text encoder); {supported}"
        )
    in_channels = shape_of(f"{UNET_PREFIX}input_blocks.0.0.weight")[1]
    context = _context_dim(keyset, shape_of)
    proj_in = [k for k in keyset if k.endswith("proj_in.weight") and k.startswith(UNET_PREFIX)]
    if context == 1024 or (proj_in and len(shape_of(proj_in[0])) == 2):
        raise UnsupportedCheckpointError(f"'{name}' is an SD2.x checkpoint; {supported}")
    # 9 input channels: an SD1.x inpainting UNet (latent + mask + masked-image latent); it stays "sd15"
    # for LoRAs, and the sampler sees `unet.config.in_channels == 9` (nodes/sd/ksampler.py).
    if in_channels not in (4, 9) or context != 768:
        raise UnsupportedCheckpointError(
            f"'{name}' has an unknown UNet ({in_channels} input channels, context {context}); {supported}"
        )
    if not any(k.startswith(VAE_PREFIX) for k in keyset):
        if not any(k.startswith(TE_PREFIXES[1]) for k in keyset):
            raise UnsupportedCheckpointError(f"'{name}' {UNET_ALONE}")
        raise UnsupportedCheckpointError(
            f"'{name}' has no VAE (no {VAE_PREFIX} keys); use a full SD1.x checkpoint"
        )
    if not any(k.startswith(TE_PREFIXES[1]) for k in keyset):
        raise UnsupportedCheckpointError(f"'{name}' has no CLIP text encoder; use a full SD1.x checkpoint")
    return "sd15"


# Marker keys of other model families (with or without ComfyUI's `model.diffusion_model.` prefix).
_OTHER_FAMILIES = (
    ("double_blocks.0.img_attn.qkv.weight", "a Flux model"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "a Stable Diffusion 3 model"),
    ("transformer_blocks.0.attn.add_q_proj.weight", "an SD3/Flux-style diffusers transformer"),
    ("down_blocks.0.0.channelwise.0.weight", "a Stable Cascade model"),
    ("blocks.0.cross_attn.q.weight", "a video or DiT model (Wan/PixArt-style)"),
    ("x_embedder.proj.weight", "a DiT model (PixArt/Hunyuan/AuraFlow-style)"),
    ("cap_embedder.0.weight", "a Lumina model"),
)


UNET_ALONE = (
    "is a UNet alone (no VAE, no text encoder); put it in models/diffusion_models (or models/unet) and "
    "load it with Load Diffusion Model (UNETLoader), with CLIPLoader and VAELoader for the other parts"
)


def _what_is_it(keys: set[str]) -> str:
    if "input_blocks.0.0.weight" in keys or (
        "conv_in.weight" in keys and "time_embedding.linear_1.weight" in keys
    ):
        return f"it {UNET_ALONE}"
    for marker, what in _OTHER_FAMILIES:
        if any(k.endswith(marker) for k in keys):
            return f"it is {what}; nodegraph runs SD1.x and SDXL-family checkpoints only"
    if any(
        k.startswith(("text_model.encoder.layers.", "transformer.resblocks.", "encoder.block."))
        or ".transformer.resblocks." in k
        for k in keys
    ):
        return (
            "it is a text encoder alone (CLIP/OpenCLIP/T5 weights, no UNet, no VAE); nodegraph needs a full "
            "checkpoint in models/checkpoints"
        )
    if any(".lora_down." in k or ".lora_A." in k or k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "it is a LoRA; put it in models/loras and use a Load LoRA node"
    if any(
        k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks."))
        for k in keys
    ):
        return "it is a VAE (SD/SDXL VAE weights only); put it in models/vae and use a Load VAE node"
    if any(k in ("string_to_param", "emb_params", "clip_l") or k.startswith("string_to_param") for k in keys):
        return "it is a textual-inversion embedding; put it in models/embeddings and write embedding:<name>"
    return f"no {UNET_PREFIX}* UNet keys found; pick an SD1.x checkpoint"


def _context_dim(keys: set[str], shape_of: ShapeOf) -> int | None:
    for k in sorted(keys):
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            return shape_of(k)[1]
    return None


def _max_index(keys: set[str], prefix: str) -> int:
    """1 + the largest N among keys `prefix` + `N.` (0 when none)."""
    found = [int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)]
    return max(found) + 1 if found else 0


@dataclass(frozen=True)
class UNetLayout:
    """What a UNet's key names and shapes say, in the LDM or the diffusers layout: per level its width
    and transformer depth, per output level the depth of each block, the middle block."""

    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    per_level: int  # res blocks per input level
    depths: tuple[int, ...]  # transformer depth per input level (0: no attention)
    up_depths: tuple[tuple[int, ...], ...]  # per output level (deepest first), per block
    mid_type: str | None
    mid_depth: int
    context_dim: int | None
    linear_projection: bool
    head_channels: int | None  # None: SD1.x's 8 heads at every width; 64: SDXL's 64-channel heads
    adm: int | None  # the label embedding's input width (SDXL's added size conditioning), or None

    def diffusers_config(self) -> dict[str, Any]:
        """The `UNet2DConditionModel` config (a `reverse_transformer_layers_per_block` only where the
        output side is not the input side mirrored)."""
        width = self.head_channels
        heads: Any = 8 if width is None else tuple(c // width for c in self.channels)
        config: dict[str, Any] = {
            "sample_size": 128 if self.head_channels else 64,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": self.channels,
            "layers_per_block": self.per_level,
            "down_block_types": tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.depths),
            "up_block_types": tuple("CrossAttnUpBlock2D" if max(u) else "UpBlock2D" for u in self.up_depths),
            "mid_block_type": self.mid_type,
            "transformer_layers_per_block": tuple(d or self.mid_depth or 1 for d in self.depths),
            "cross_attention_dim": self.context_dim,
            "attention_head_dim": heads,  # diffusers' historical name: the number of heads
            "use_linear_projection": self.linear_projection,
        }
        if self.up_depths != tuple((d,) * (self.per_level + 1) for d in reversed(self.depths)):
            config["reverse_transformer_layers_per_block"] = tuple(
                tuple(d or 1 for d in level) for level in self.up_depths
            )
        if self.adm is not None:
            config |= {
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": SIZE_EMBED_DIM,
                "projection_class_embeddings_input_dim": self.adm,
            }
        return config


def unet_config(
    name: str, keys: Iterable[str], shape_of: ShapeOf, head_channels: int | None = None
) -> dict[str, Any]:
    """A `UNet2DConditionModel` config for an LDM UNet of any depth, read from key names and shapes.

    `head_channels` None: SD1.x's 8 heads at every width; 64: SDXL's 64-channel heads (heads = width / 64).
    Transformer depths are read per res block on both sides (SSD-1B and Vega shapes included); a
    `label_emb` gives SDXL's added size conditioning (`text_time`, 256 per size value).
    """
    keyset = {k[len(UNET_PREFIX) :] for k in keys if k.startswith(UNET_PREFIX)}

    def shape(key: str) -> Shape:
        return shape_of(UNET_PREFIX + key)

    levels, channels = _input_levels(name, keyset, shape)
    depths = [level[0] for level in levels]
    mid_type, mid_depth = _middle_block(keyset)
    if mid_depth and depths[-1] not in (0, mid_depth):
        # diffusers gives the middle block the last level's depth; a different one has no diffusers form.
        raise UnsupportedCheckpointError(f"'{name}': last-level and middle transformer depths differ")
    per_level = len(levels[0])
    reverse = _output_depths(name, keyset, len(levels), per_level) or [
        [d] * (per_level + 1) for d in reversed(depths)
    ]  # no output keys to read (a shape probe): the usual mirror of the input side
    layout = UNetLayout(
        in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0],
        channels=tuple(channels),
        per_level=per_level,
        depths=tuple(depths),
        up_depths=tuple(tuple(level) for level in reverse),
        mid_type=mid_type,
        mid_depth=mid_depth,
        context_dim=_context_dim({UNET_PREFIX + k for k in keyset}, shape_of),
        linear_projection=any(len(shape(k)) == 2 for k in keyset if k.endswith("proj_in.weight")),
        head_channels=head_channels,
        adm=shape("label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in keyset else None,
    )
    return layout.diffusers_config()


def _middle_block(keyset: set[str]) -> tuple[str | None, int]:
    """diffusers' middle block type and its transformer depth, as ComfyUI's `transformer_depth_middle`.

    A transformer at `middle_block.1` (SD1.x, SDXL): cross-attention block of that depth. Only a res
    block at `middle_block.0` (-1: SSD-1B, Segmind Vega): `UNetMidBlock2D` with no attention. No
    middle block at all (-2: KOALA): None.
    """
    depth = _max_index(keyset, "middle_block.1.transformer_blocks.")
    if depth:
        return "UNetMidBlock2DCrossAttn", depth
    if "middle_block.0.in_layers.0.weight" in keyset:
        return "UNetMidBlock2D", 0
    return None, 0


SIZE_EMBED_DIM = 256  # each SDXL size/crop/score value becomes a 256-wide sinusoid (ComfyUI Timestep(256))


def _input_levels(
    name: str, keyset: set[str], shape: Callable[[str], Shape]
) -> tuple[list[list[int]], list[int]]:
    """Transformer depth of each input res block, grouped by level, and each level's width."""
    levels: list[list[int]] = [[]]
    channels: list[int] = []
    for n in range(1, _max_index(keyset, "input_blocks.")):
        if f"input_blocks.{n}.0.op.weight" in keyset:
            levels.append([])
            continue
        if not levels[-1]:
            channels.append(shape(f"input_blocks.{n}.0.out_layers.3.weight")[0])
        levels[-1].append(_max_index(keyset, f"input_blocks.{n}.1.transformer_blocks."))
    if len({len(level) for level in levels}) != 1 or any(len(set(level)) != 1 for level in levels):
        raise UnsupportedCheckpointError(
            f"'{name}' has a UNet with uneven blocks per level; it cannot be built"
        )
    return levels, channels


def _output_depths(name: str, keyset: set[str], levels: int, per_level: int) -> list[list[int]]:
    """Transformer depth of each output res block, per up level (deepest level first)."""
    count = _max_index(keyset, "output_blocks.")
    if count == 0:
        return []
    if count != levels * (per_level + 1):
        raise UnsupportedCheckpointError(
            f"'{name}' has {count} UNet output blocks, expected {levels * (per_level + 1)}; "
            "it cannot be built"
        )
    depths = [_max_index(keyset, f"output_blocks.{n}.1.transformer_blocks.") for n in range(count)]
    return [depths[i : i + per_level + 1] for i in range(0, count, per_level + 1)]


def vae_config(name: str, shape_of: ShapeOf) -> dict[str, Any]:
    """An `AutoencoderKL` config: ComfyUI's fixed SD VAE layout, latent channels from the file."""
    first = shape_of(f"{VAE_PREFIX}encoder.conv_in.weight")[0]
    if first != SD1_VAE_BLOCKS[0]:
        raise UnsupportedCheckpointError(f"'{name}' has a VAE of width {first}, not the standard SD VAE")
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": SD1_VAE_BLOCKS,
        "layers_per_block": 2,
        "latent_channels": shape_of(f"{VAE_PREFIX}decoder.conv_in.weight")[1],
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def clip_config(keys: Iterable[str], shape_of: ShapeOf, te: dict[str, str] | None = None) -> dict[str, Any]:
    """A `CLIPTextConfig` for the CLIP-L text tower: width and depth read from the file.

    `te` is the parameter -> file key map (`te_key_map(keys)` when not given: the SD1.x layout)."""
    te = te if te is not None else te_key_map(keys)
    vocab, width = shape_of(te["embeddings.token_embedding.weight"])
    layers = _max_index(set(te), "encoder.layers.")
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shape_of(te["encoder.layers.0.mlp.fc1.weight"])[0],
        "num_hidden_layers": layers,
        "num_attention_heads": width // 64,
        "max_position_embeddings": shape_of(te["embeddings.position_embedding.weight"])[0],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "projection_dim": width,
    }


def _refs(keys: Iterable[str], shape_of: ShapeOf) -> dict[str, _Ref]:
    return {k: _Ref(k, shape_of(k)) for k in keys}


def unet_key_map(keys: Iterable[str], shape_of: ShapeOf, config: dict[str, Any]) -> dict[str, str]:
    """diffusers UNet parameter name -> LDM key (diffusers' own renaming, run on key references)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    refs = _refs((k for k in keys if k.startswith(UNET_PREFIX)), shape_of)
    wanted = {k: config[k] for k in ("layers_per_block", "addition_embed_type") if k in config}
    converted = convert_ldm_unet_checkpoint(refs, wanted)
    return {name: ref.key for name, ref in converted.items() if isinstance(ref, _Ref)}


def vae_key_map(keys: Iterable[str], shape_of: ShapeOf) -> dict[str, str]:
    """diffusers AutoencoderKL parameter name -> LDM key."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    refs = _refs((k for k in keys if k.startswith(VAE_PREFIX)), shape_of)
    blocks = ("DownEncoderBlock2D",) * 4
    converted = convert_ldm_vae_checkpoint(refs, {"down_block_types": blocks, "up_block_types": blocks})
    return {name: ref.key for name, ref in converted.items() if isinstance(ref, _Ref)}


def te_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel parameter name (no `text_model.` level in transformers >= 5) -> LDM key."""
    out: dict[str, str] = {}
    for key in keys:
        for prefix in TE_PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                if not rest.startswith("text_model.") and not rest.endswith("position_ids"):
                    out[rest] = key
                break
    return out
