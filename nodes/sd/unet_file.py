"""UNet-only files (ComfyUI's UNETLoader, folder `diffusion_models` = models/unet + models/diffusion_models).

An SD1.x or SDXL-family UNet in the LDM/SGM layout (with or without the checkpoint's
`model.diffusion_model.` prefix; a full checkpoint is accepted too, its UNet alone is read, as
ComfyUI's `load_diffusion_model` does) or in diffusers' layout (`down_blocks.*`, what a diffusers
folder's `unet/diffusion_pytorch_model.safetensors` holds). The family comes from the tensors, as
for checkpoints: `label_emb` (diffusers: `add_embedding`) of width 2816 is SDXL base, 2560 the refiner;
no label embedding, context 768 and 4 or 9 input channels is SD1.x; anything else is refused, named.

`weight_dtype` is ComfyUI's: "default" keeps the file's values (fp32 storage, as every UNet here);
the fp8 choices round every weight to that float8 format once, at load, and keep fp32 storage.
ComfyUI stores them as fp8 and upcasts each weight to the compute dtype when a layer runs, which
gives the same numbers; `fp8_e4m3fn_fast` only differs on GPUs with fp8 matrix units, so here it
is `fp8_e4m3fn`. A LoRA or merge on such a UNet is rounded back to fp8 as ComfyUI rounds it
(stochastically, seeded per weight: `nodes.sd.float8`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.sd import convert
from nodes.sd.checkpoint import (
    _LDM_NAMES,
    CheckpointError,
    TensorSource,
    _Prefixed,
    _to_fp32,
    assign_weights,
    layout_errors,
    open_source,
)
from nodes.sd.convert import UNET_PREFIX, Shape, UnsupportedCheckpointError, _max_index
from nodes.sd.convert_sdxl import BASE_ADM, REFINER_ADM
from nodes.sd.float8 import mark_storage
from nodes.sd.model_sampling import EPS, ModelSampling, checkpoint_sampling

WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
_FP8 = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
SUPPORTED = "nodegraph runs SD1.x and SDXL-family UNets"


@dataclass(eq=False)
class LoadedUnet:
    """A UNet read from a UNet-only file: shared (read-only) by every MODEL handle made from it."""

    path: Path
    family: str  # "sd15", "sdxl", "sdxl_refiner"
    unet: Any
    sampling: ModelSampling = EPS
    weight_dtype: str = "default"


def weight_cast(weight_dtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cast each weight gets on load for one of ComfyUI's `weight_dtype` choices."""
    if weight_dtype == "default":
        return _to_fp32
    dtype = _FP8.get(weight_dtype)
    if dtype is None:
        raise ValueError(f"unknown weight_dtype {weight_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")

    def to_fp8_values(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).to(torch.float32).contiguous()

    return to_fp8_values


def load_unet_file(path: Path, weight_dtype: str = "default") -> LoadedUnet:
    """Load the UNet of `path` (see the module docstring for the layouts and families).

    Raises:
        CheckpointError: unreadable file, another model kind or family (the message names it), or
            tensors that do not fit the UNet built from their shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"UNet file '{path}' does not exist; put it in models/diffusion_models")
    cast = weight_cast(weight_dtype)
    source = open_source(path)
    keys = source.keys()
    with layout_errors(path.name, "UNet of its kind"):
        if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
            unet, family = _diffusers_layout(path.name, source, cast)
        else:
            unet, family = _ldm_layout(path.name, source, cast)
    # SDXL v-prediction marker keys (`v_pred`, `ztsnr`) are read as for a checkpoint (ComfyUI reads
    # them for the SDXL class from whatever file the model came from).
    sampling = checkpoint_sampling(path) if family == "sdxl" else EPS
    if weight_dtype in _FP8:
        mark_storage(unet, _FP8[weight_dtype])  # so a LoRA or merge is rounded back as in ComfyUI
    return LoadedUnet(path, family, unet, sampling, weight_dtype)


def _ldm_layout(
    name: str, source: TensorSource, cast: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[Any, str]:
    keys = source.keys()
    if not any(k.startswith(UNET_PREFIX) for k in keys) and "input_blocks.0.0.weight" not in keys:
        raise UnsupportedCheckpointError(f"'{name}' is not a UNet: {_what_else(keys)}")
    prefixed = _Prefixed(source, UNET_PREFIX)
    unet_keys = [k for k in prefixed.keys() if k.startswith(UNET_PREFIX)]
    family = _ldm_family(name, unet_keys, prefixed.shape)
    heads = None if family == "sd15" else 64  # SDXL: 64-channel heads at every level
    config = convert.unet_config(name, unet_keys, prefixed.shape, heads)
    key_map = convert.unet_key_map(unet_keys, prefixed.shape, config)
    unet = _build(config, key_map, prefixed, name, cast)
    _LDM_NAMES[unet] = {ldm: p for p, ldm in key_map.items()}
    return unet, family


def _ldm_family(name: str, keys: list[str], shape_of: Callable[[str], Shape]) -> str:
    keyset = set(keys)
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in keyset:
        raise UnsupportedCheckpointError(f"'{name}' is not a UNet: {_what_else(keys)}")
    label = f"{UNET_PREFIX}label_emb.0.0.weight"
    adm = shape_of(label)[1] if label in keyset else None
    context = convert._context_dim(keyset, shape_of)
    in_channels = shape_of(f"{UNET_PREFIX}input_blocks.0.0.weight")[1]
    linear = any(len(shape_of(k)) == 2 for k in keyset if k.endswith("proj_in.weight"))
    return _family(name, adm, context, in_channels, linear)


def _family(name: str, adm: int | None, context: int | None, in_channels: int, linear: bool) -> str:
    """SD1.x, SDXL base or refiner from what the UNet's shapes say; anything else is refused."""
    if adm is not None:
        if adm == BASE_ADM:
            return "sdxl"
        if adm == REFINER_ADM:
            return "sdxl_refiner"
        raise UnsupportedCheckpointError(
            f"'{name}' is a UNet with added conditioning of width {adm} (SDXL base: {BASE_ADM}, refiner: "
            f"{REFINER_ADM}): an SDXL variant or another family; {SUPPORTED}"
        )
    if context == 1024 or (linear and context != 768):
        raise UnsupportedCheckpointError(f"'{name}' is an SD2.x UNet (context {context}); {SUPPORTED}")
    if context != 768 or in_channels not in (4, 9) or linear:
        raise UnsupportedCheckpointError(
            f"'{name}' has an unknown UNet ({in_channels} input channels, context {context}); {SUPPORTED}"
        )
    return "sd15"


def _what_else(keys: Iterable[str]) -> str:
    keyset = set(keys)
    if any(k.startswith(("first_stage_model.", "cond_stage_model.", "conditioner.")) for k in keyset):
        return "it has no UNet of a supported layout"
    if any(k.startswith(("text_model.", "transformer.resblocks.")) for k in keyset):
        return "it is a text encoder; put it in models/text_encoders and load it with Load CLIP (CLIPLoader)"
    return convert._what_is_it(keyset).replace("; pick an SD1.x checkpoint", "")


def _build(
    config: dict[str, Any],
    key_map: dict[str, str],
    source: TensorSource,
    name: str,
    cast: Callable[[torch.Tensor], torch.Tensor],
) -> Any:
    from diffusers import UNet2DConditionModel

    with torch.inference_mode(False):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        return assign_weights(unet, key_map, source, name, "UNet", cast)


# ---- diffusers' layout: the config read from key names and shapes, the names used as they are


def _diffusers_layout(
    name: str, source: TensorSource, cast: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[Any, str]:
    keys = source.keys()
    config = diffusers_unet_config(name, keys, source.shape)
    adm = config.get("projection_class_embeddings_input_dim")
    family = _family(
        name,
        adm,
        config["cross_attention_dim"],
        config["in_channels"],
        bool(config["use_linear_projection"]) and adm is None,
    )
    key_map = {k: k for k in keys}
    return _build(config, key_map, source, name, cast), family


def diffusers_unet_config(name: str, keys: Iterable[str], shape_of: Callable[[str], Shape]) -> dict[str, Any]:
    """A `UNet2DConditionModel` config from a diffusers-layout state dict's names and shapes
    (what `unet/config.json` would say; depths per block read like `convert.unet_config`'s)."""
    keyset = set(keys)
    levels = _max_index(keyset, "down_blocks.")
    if not levels:
        raise UnsupportedCheckpointError(f"'{name}' has no down_blocks; it is not a diffusers UNet")
    channels = [shape_of(f"down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
    per_level = _max_index(keyset, "down_blocks.0.resnets.")
    depths = [_max_index(keyset, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(levels)]
    ups = [
        [
            _max_index(keyset, f"up_blocks.{i}.attentions.{j}.transformer_blocks.")
            for j in range(per_level + 1)
        ]
        for i in range(_max_index(keyset, "up_blocks."))
    ]
    mid_depth = _max_index(keyset, "mid_block.attentions.0.transformer_blocks.")
    mid_type = (
        "UNetMidBlock2DCrossAttn"
        if mid_depth
        else "UNetMidBlock2D"
        if "mid_block.resnets.0.conv1.weight" in keyset
        else None
    )
    if mid_depth and depths[-1] not in (0, mid_depth):
        raise UnsupportedCheckpointError(f"'{name}': last-level and middle transformer depths differ")
    to_k = sorted(k for k in keyset if k.endswith("attn2.to_k.weight"))
    proj_in = [k for k in keyset if k.endswith("proj_in.weight")]
    sdxl = "add_embedding.linear_1.weight" in keyset
    layout = convert.UNetLayout(
        in_channels=shape_of("conv_in.weight")[1],
        out_channels=shape_of("conv_out.weight")[0],
        channels=tuple(channels),
        per_level=per_level,
        depths=tuple(depths),
        up_depths=tuple(tuple(u) for u in ups),
        mid_type=mid_type,
        mid_depth=mid_depth,
        context_dim=shape_of(to_k[0])[1] if to_k else None,
        linear_projection=any(len(shape_of(k)) == 2 for k in proj_in),
        head_channels=64 if sdxl else None,
        adm=shape_of("add_embedding.linear_1.weight")[1] if sdxl else None,
    )
    return layout.diffusers_config()
