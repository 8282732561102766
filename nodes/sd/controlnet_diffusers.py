"""The config of a ControlNet saved in diffusers' layout (`controlnet_cond_embedding.*`,
`down_blocks.*`, `controlnet_down_blocks.*`: the single .safetensors of a diffusers ControlNet
folder), read from its key names and shapes. ComfyUI loads these files too (comfy/controlnet.py
renames them to the original layout); here the names already are the model's, so only the config
is needed. SD1.x (8 heads) and SDXL (64-channel heads, `add_embedding`) shapes.

Reduced-depth SDXL ControlNets (`diffusers/controlnet-canny-sdxl-1.0-small` and `-mid`, the
`diffusers_xl_*_small` / `_mid` files of lllyasviel's sd_control_collection) have transformer depths
[0, 0, 0] / mid 0 and [0, 0, 1] / mid 1: diffusers still saves a depth-0 `Transformer2DModel`
(`norm`, `proj_in`, `proj_out`, no `transformer_blocks`) at each attention slot. ComfyUI
(comfy/model_detection.py `SDXL_small_cnet` / `SDXL_mid_cnet`, comfy/utils.py `unet_to_diffusers`,
comfy/cldm/cldm.py) builds no transformer at a down level of depth 0, so that level's `norm` /
`proj_*` are left over and it runs as resnets only, while the middle block keeps its depth-0
transformer (`x + proj_out(proj_in(norm(x)))`). The same here, for the same images: such a level is a
`DownBlock2D` and `key_map` leaves its attention keys out (diffusers' own ControlNetModel would apply
them). Context width: the first `attn2.to_k`, or SDXL's 2048 / SD1's 768 when no block has one.
"""

from __future__ import annotations

from collections.abc import Callable

from nodes.sd.convert import SIZE_EMBED_DIM

MARKER = "controlnet_cond_embedding.conv_in.weight"
MID = "mid_block.attentions.0."
SDXL_CONTEXT, SD1_CONTEXT = 2048, 768
Shape = tuple[int, ...]


def _count(keys: set[str], prefix: str) -> int:
    found = [int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)]
    return max(found) + 1 if found else 0


def _depth(keys: set[str], prefix: str) -> int | None:
    """Transformer blocks of the `Transformer2DModel` at `prefix` (0: `norm`/`proj_*` only), None when
    there is none."""
    if f"{prefix}proj_in.weight" not in keys:
        return None
    return _count(keys, f"{prefix}transformer_blocks.")


def level_depths(keys: set[str]) -> tuple[list[int | None], int | None]:
    """(transformer depth of each down level's first attention slot, of the middle block); None where
    the file has no transformer there."""
    levels = _count(keys, "down_blocks.")
    return [_depth(keys, f"down_blocks.{i}.attentions.0.") for i in range(levels)], _depth(keys, MID)


def diffusers_config(keys: set[str], shape: Callable[[str], Shape]) -> dict[str, object]:
    """A `ControlNetModel` config for a diffusers-layout ControlNet (raises KeyError when incomplete,
    ValueError for a layout diffusers' ControlNetModel cannot express)."""
    depths, mid_depth = level_depths(keys)
    levels = len(depths)
    channels = tuple(shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    # diffusers gives the middle block transformer_layers_per_block[-1]
    last = depths[-1] or None
    if last is not None and mid_depth is not None and last != mid_depth:
        raise ValueError(f"its last level has {last} transformer blocks and its middle block {mid_depth}")
    tail = mid_depth if mid_depth is not None else (last or 1)
    context = next((shape(k)[1] for k in sorted(keys) if k.endswith("attn2.to_k.weight")), None)
    sdxl = "add_embedding.linear_1.weight" in keys
    blocks = _count(keys, "controlnet_cond_embedding.blocks.")
    embedding = (shape(MARKER)[0],) + tuple(
        shape(f"controlnet_cond_embedding.blocks.{i}.weight")[0] for i in range(1, blocks, 2)
    )
    config: dict[str, object] = {
        "in_channels": shape("conv_in.weight")[1],
        "conditioning_channels": shape(MARKER)[1],
        "conditioning_embedding_out_channels": embedding,
        "block_out_channels": channels,
        "layers_per_block": _count(keys, "down_blocks.0.resnets."),
        "down_block_types": tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths),
        "mid_block_type": "UNetMidBlock2D" if mid_depth is None else "UNetMidBlock2DCrossAttn",
        # a DownBlock2D level's entry is unused: the middle block's depth (or 1) as before
        "transformer_layers_per_block": (*(d or mid_depth or 1 for d in depths[:-1]), tail),
        "cross_attention_dim": context or (SDXL_CONTEXT if sdxl else SD1_CONTEXT),
        "attention_head_dim": tuple(c // 64 for c in channels) if sdxl else 8,
        "use_linear_projection": any(len(shape(k)) == 2 for k in keys if k.endswith("proj_in.weight")),
    }
    if sdxl:
        config |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SIZE_EMBED_DIM,
            "projection_class_embeddings_input_dim": shape("add_embedding.linear_1.weight")[1],
        }
    return config


def left_over(keys: set[str], config: dict[str, object]) -> set[str]:
    """The file's keys the network of `config` has no place for: the depth-0 transformers (`norm`,
    `proj_in`, `proj_out`) of down levels built as `DownBlock2D`, which ComfyUI leaves over too."""
    types = config["down_block_types"]
    assert isinstance(types, tuple)
    plain = tuple(f"down_blocks.{i}.attentions." for i, t in enumerate(types) if t == "DownBlock2D")
    return {k for k in keys if k.startswith(plain)}


def key_map(keys: set[str], config: dict[str, object]) -> dict[str, str]:
    """{parameter name: file key}: the names are the file's, less `left_over`."""
    skip = left_over(keys, config)
    return {k: k for k in keys if k not in skip}
