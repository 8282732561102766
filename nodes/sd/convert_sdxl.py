"""SDXL-family single files (SGM layout) -> diffusers/transformers configs and parameter names.

An SDXL base file holds `model.diffusion_model.*` (UNet with `label_emb`), `first_stage_model.*`
(the SD VAE), `conditioner.embedders.0.transformer.text_model.*` (CLIP-L, HF names) and
`conditioner.embedders.1.model.*` (OpenCLIP bigG, open_clip names). The refiner has bigG alone, as
`conditioner.embedders.0.model.*`. What each depth, width and head count is comes from the tensors
(SSD-1B, Vega and KOALA are SDXL with other depths), as ComfyUI's `detect_unet_config` reads them.

bigG's open_clip layout fuses q, k and v in `attn.in_proj_weight` and stores the projection as
`x @ P`. transformers wants three Linears and `P.T`, so the map below names *views* of a file key:
`key#q` / `key#k` / `key#v` (a third of the rows) and `key#T` (transposed). `SplitSource` reads such
a view one tensor at a time, so no second full copy of bigG is ever in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nodes.sd.convert import UNET_PREFIX, VAE_PREFIX, Shape, ShapeOf, UnsupportedCheckpointError, _max_index
from nodes.sd.header_json import MAX_HEADER_DEPTH, json_depth_ok

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
CLIP_G_BASE = "conditioner.embedders.1.model."
CLIP_G_REFINER = "conditioner.embedders.0.model."
SDXL_LATENT_SCALE = 0.13025  # comfy/latent_formats.py SDXL.scale_factor
BASE_ADM = 2816  # pooled 1280 + 6 size embeddings of 256
REFINER_ADM = 2560  # pooled 1280 + 4 size embeddings + the aesthetic score
SPLIT = ("q", "k", "v")
UNET_ALONE_HINT = (
    "put it in models/diffusion_models (or models/unet) and load it with Load Diffusion Model (UNETLoader), "
    "with DualCLIPLoader (type sdxl) and VAELoader for the other parts"
)

# open_clip resblock names -> transformers CLIPEncoderLayer names (comfy/utils.py transformers_convert)
_LAYER_NAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def is_sdxl(keys: Iterable[str]) -> bool:
    """True for a file with SDXL's conditioner or its UNet's label embedding."""
    label = f"{UNET_PREFIX}label_emb.0.0.weight"
    return any(k.startswith("conditioner.embedders.") or k == label for k in keys)


def detect_family(name: str, keys: Iterable[str], shape_of: ShapeOf) -> str:
    """ "sdxl" (base family: SDXL, Pony, Illustrious, SSD-1B, Vega, KOALA ...) or "sdxl_refiner";
    otherwise `UnsupportedCheckpointError` saying what the file is."""
    keyset = set(keys)
    label = f"{UNET_PREFIX}label_emb.0.0.weight"
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in keyset or label not in keyset:
        what = "an SDXL text encoder" if any(k.startswith("conditioner.") for k in keyset) else "incomplete"
        raise UnsupportedCheckpointError(
            f"'{name}' has SDXL keys but no SDXL UNet (no {label}): it is {what}, not a full SDXL "
            "checkpoint; put a complete checkpoint in models/checkpoints"
        )
    adm = shape_of(label)[1]
    has_l = any(k.startswith(CLIP_L_PREFIX) for k in keyset)
    has_g_base = any(k.startswith(CLIP_G_BASE) for k in keyset)
    has_g_refiner = any(k.startswith(CLIP_G_REFINER) for k in keyset)
    if not any(k.startswith(VAE_PREFIX) for k in keyset):
        if not any(k.startswith("conditioner.") for k in keyset):
            raise UnsupportedCheckpointError(
                f"'{name}' is an SDXL UNet alone (no VAE, no text encoders); {UNET_ALONE_HINT}"
            )
        raise UnsupportedCheckpointError(
            f"'{name}' is an SDXL UNet without a VAE (no {VAE_PREFIX} keys); use a full SDXL checkpoint"
        )
    if adm == BASE_ADM:
        if not (has_l and has_g_base):
            raise UnsupportedCheckpointError(
                f"'{name}' is an SDXL base UNet without both text encoders (CLIP-L {_yes(has_l)}, "
                f"OpenCLIP bigG {_yes(has_g_base)}); use a full SDXL checkpoint"
            )
        return "sdxl"
    if adm == REFINER_ADM:
        if not has_g_refiner:
            raise UnsupportedCheckpointError(
                f"'{name}' is an SDXL refiner UNet without its OpenCLIP bigG text encoder; use the full "
                "refiner checkpoint"
            )
        return "sdxl_refiner"
    raise UnsupportedCheckpointError(
        f"'{name}' has an SDXL-like UNet with added conditioning of width {adm} (SDXL base: {BASE_ADM}, "
        f"refiner: {REFINER_ADM}); this variant is not supported"
    )


def _yes(flag: bool) -> str:
    return "present" if flag else "missing"


def clip_l_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers `CLIPTextModel` parameter name -> file key, for SDXL's CLIP-L."""
    return {
        k[len(CLIP_L_PREFIX) :]: k
        for k in keys
        if k.startswith(CLIP_L_PREFIX) and not k.endswith("position_ids")
    }


def clip_g_prefix(family: str) -> str:
    return CLIP_G_REFINER if family == "sdxl_refiner" else CLIP_G_BASE


def clip_g_key_map(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """transformers `CLIPTextModelWithProjection` parameter name -> file key or `key#view`."""
    out: dict[str, str] = {
        "text_model.embeddings.token_embedding.weight": f"{prefix}token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": f"{prefix}positional_embedding",
        "text_model.final_layer_norm.weight": f"{prefix}ln_final.weight",
        "text_model.final_layer_norm.bias": f"{prefix}ln_final.bias",
        "text_projection.weight": f"{prefix}text_projection#T",
    }
    blocks = f"{prefix}transformer.resblocks."
    for key in keys:
        if not key.startswith(blocks):
            continue
        index, rest = key[len(blocks) :].split(".", 1)
        layer = f"text_model.encoder.layers.{index}."
        if rest.startswith("attn.in_proj_"):
            kind = rest.removeprefix("attn.in_proj_")  # weight / bias
            for part in SPLIT:
                out[f"{layer}self_attn.{part}_proj.{kind}"] = f"{key}#{part}"
            continue
        module, param = rest.rsplit(".", 1)
        if module in _LAYER_NAMES:
            out[f"{layer}{_LAYER_NAMES[module]}.{param}"] = key
        else:
            out[f"{layer}{rest}"] = key  # unknown: assign_weights reports it as unexpected
    return out


def view_shape(key: str, shape_of: ShapeOf) -> Shape:
    """The shape of a file key or of a `key#view` (see the module docstring)."""
    base, _, view = key.partition("#")
    shape = shape_of(base)
    if view == "T":
        return tuple(reversed(shape))
    if view in SPLIT:
        return (shape[0] // 3, *shape[1:])
    return shape


def clip_g_config(keys: Iterable[str], prefix: str, shape_of: ShapeOf) -> dict[str, Any]:
    """A `CLIPTextConfig` for bigG (gelu, width and depth from the file; ComfyUI's clip_config_bigg)."""
    vocab, width = shape_of(f"{prefix}token_embedding.weight")
    blocks = f"{prefix}transformer.resblocks."
    return {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shape_of(f"{blocks}0.mlp.c_fc.weight")[0],
        "num_hidden_layers": _max_index(set(keys), blocks),
        "num_attention_heads": width // 64,
        "max_position_embeddings": shape_of(f"{prefix}positional_embedding")[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
        "projection_dim": shape_of(f"{prefix}text_projection")[1],
    }


def checkpoint_kind(path: Path) -> str:
    """ "sdxl", "sdxl_refiner" or "other", from a .safetensors header alone (torch-free, no tensor read)."""
    family = checkpoint_family(path)
    return family if family in ("sdxl", "sdxl_refiner") else "other"


def checkpoint_family(path: Path) -> str:
    """The LoRA family a checkpoint file or diffusers folder takes ("sd15", "sd2", "sdxl",
    "sdxl_refiner"), or "unknown"; from the safetensors header or the folder's layout alone."""
    if path.is_dir():
        if (path / "text_encoder_2").is_dir():
            return "sdxl" if (path / "text_encoder").is_dir() else "sdxl_refiner"
        return "sd15" if (path / "text_encoder").is_dir() else "unknown"
    keys = _header_keys(path)
    if is_sdxl(keys):
        if any(k.startswith(CLIP_L_PREFIX) for k in keys):
            return "sdxl"
        return "sdxl_refiner" if any(k.startswith(CLIP_G_REFINER) for k in keys) else "unknown"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"  # OpenCLIP-H under SD2's prefix
    return "sd15" if any(k.startswith("cond_stage_model.transformer.") for k in keys) else "unknown"


def _header_keys(path: Path) -> list[str]:
    try:
        if path.suffix.lower() not in (".safetensors", ".sft") or not path.is_file():
            return []
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > 100_000_000:
                return []
            raw = f.read(size)
        if not json_depth_ok(raw, MAX_HEADER_DEPTH):  # json.loads would recurse into a RecursionError
            return []
        header = json.loads(raw)
    except (OSError, ValueError, TypeError):
        return []
    # a header is an object of tensor names; anything else (a list, numbers) names no tensor
    return [k for k in header if isinstance(k, str)] if isinstance(header, dict) else []
