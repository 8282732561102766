"""The config of a ControlNet saved in diffusers' layout (`controlnet_cond_embedding.*`,
`down_blocks.*`, `controlnet_down_blocks.*`: the single .safetensors of a diffusers ControlNet
folder), read from its key names and shapes. ComfyUI loads these files too (comfy/controlnet.py
renames them to the original layout); here the names already are the model's, so only the config
is needed. SD1.x (8 heads) and SDXL (64-channel heads, `add_embedding`) shapes.
"""

from __future__ import annotations

from collections.abc import Callable

from nodes.sd.convert import SIZE_EMBED_DIM

MARKER = "controlnet_cond_embedding.conv_in.weight"
Shape = tuple[int, ...]


def _count(keys: set[str], prefix: str) -> int:
    found = [int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)]
    return max(found) + 1 if found else 0


def diffusers_config(keys: set[str], shape: Callable[[str], Shape]) -> dict[str, object]:
    """A `ControlNetModel` config for a diffusers-layout ControlNet (raises KeyError when incomplete)."""
    levels = _count(keys, "down_blocks.")
    channels = tuple(shape(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels))
    depths = [_count(keys, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels)]
    mid_depth = _count(keys, "mid_block.attentions.0.transformer_blocks.")
    context = next(shape(k)[1] for k in sorted(keys) if k.endswith("attn2.to_k.weight"))
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
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid_depth else "UNetMidBlock2D",
        "transformer_layers_per_block": tuple(d or mid_depth or 1 for d in depths),
        "cross_attention_dim": context,
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
