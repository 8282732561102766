"""Text-encoder files (ComfyUI's CLIPLoader and DualCLIPLoader, folder `text_encoders` = models/text_encoders
+ models/clip).

Each file is one encoder, in transformers' layout (`text_model.encoder.layers.*`, as ComfyUI's
`clip_l.safetensors` / `clip_g.safetensors` ship) or open_clip's (`transformer.resblocks.*`). Which
encoder it is comes from its depth, by ComfyUI's rule (`comfy/sd.py` `detect_te_model`): a layer 30
is OpenCLIP bigG, a layer 22 OpenCLIP ViT-H (SD2.x, refused), else CLIP-L. What the encoders make:

* CLIPLoader `stable_diffusion`: CLIP-L alone is SD1.x's text encoder; bigG alone is the SDXL
  refiner's (ComfyUI's `SDXLRefinerClipModel`).
* DualCLIPLoader `sdxl`: one CLIP-L and one bigG, in either order: SDXL's two encoders.

Every other type is for a model family nodegraph does not run, and is refused naming it. Weights are
fp16-rounded in fp32 storage, as the checkpoint loader keeps text encoders (ComfyUI stores them fp16).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.sd import convert, convert_sdxl
from nodes.sd.checkpoint import CheckpointError, TensorSource, build_text_encoder, open_source
from nodes.sd.checkpoint_sdxl import SplitSource, build_text_encoder_g
from nodes.sd.convert import UNET_PREFIX, _max_index

CLIP_TYPES = (
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
    "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image",
)  # fmt: skip
DUAL_CLIP_TYPES = ("sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image")
HF_LAYERS = "text_model.encoder.layers."
OPEN_CLIP_LAYERS = "transformer.resblocks."
SUPPORTED = (
    "nodegraph runs SD1.x and SDXL: CLIPLoader type stable_diffusion (a CLIP-L for SD1.x, or a bigG for "
    "the SDXL refiner) and DualCLIPLoader type sdxl (a CLIP-L and a bigG)"
)


@dataclass(eq=False)
class LoadedClip:
    """The text encoders read from CLIP files: SD1.x (`text_encoder` CLIP-L), SDXL (CLIP-L and bigG
    as `text_encoder_2`) or the SDXL refiner (bigG alone, `text_encoder` None)."""

    family: str
    text_encoder: Any
    text_encoder_2: Any = None


@dataclass(eq=False)
class _Encoder:
    kind: str  # "l" or "g"
    module: Any
    name: str


def check_clip_type(clip_type: str, count: int) -> None:
    """Refuse, before any file is read, the types of families nodegraph does not run."""
    wanted = "stable_diffusion" if count == 1 else "sdxl"
    if clip_type != wanted:
        loader = "CLIPLoader" if count == 1 else "DualCLIPLoader"
        raise CheckpointError(
            f"{loader} type '{clip_type}' is for a model family nodegraph does not run; {SUPPORTED}"
        )


def load_clip_files(paths: Sequence[Path], clip_type: str) -> LoadedClip:
    """The text encoders of one CLIPLoader (one path) or DualCLIPLoader (two paths).

    Raises:
        CheckpointError: a type or an encoder of another family, two encoders of one kind, or a
            file that is not a text encoder (the message names the file and what it is).
    """
    check_clip_type(clip_type, len(paths))
    encoders = [read_text_encoder(Path(p)) for p in paths]
    if len(encoders) == 1:
        (only,) = encoders
        if only.kind == "l":
            return LoadedClip("sd15", only.module)
        return LoadedClip("sdxl_refiner", None, only.module)
    kinds = sorted(e.kind for e in encoders)
    if kinds != ["g", "l"]:
        what = "CLIP-L" if kinds[0] == "l" else "OpenCLIP bigG"
        raise CheckpointError(
            f"DualCLIPLoader type sdxl needs one CLIP-L and one OpenCLIP bigG; '{encoders[0].name}' and "
            f"'{encoders[1].name}' are both {what}"
        )
    by_kind = {e.kind: e.module for e in encoders}
    return LoadedClip("sdxl", by_kind["l"], by_kind["g"])


def read_text_encoder(path: Path) -> _Encoder:
    """One text-encoder file as a transformers module, its kind read from its depth."""
    if not path.is_file():
        raise CheckpointError(f"text encoder '{path}' does not exist; put it in models/text_encoders")
    source = open_source(path)
    with torch.inference_mode(False):
        return _read(path.name, source)


def _read(name: str, source: TensorSource) -> _Encoder:
    keys = source.keys()
    if any(k.startswith(OPEN_CLIP_LAYERS) for k in keys):
        layers = _max_index(set(keys), OPEN_CLIP_LAYERS)
        _check_depth(name, layers)
        if layers <= 30:
            raise CheckpointError(
                f"'{name}' is an open_clip-layout CLIP-L; nodegraph reads CLIP-L in transformers' layout "
                "(text_model.*) as ComfyUI ships it"
            )
        return _Encoder("g", _open_clip_g(name, keys, source), name)
    if any(k.startswith(HF_LAYERS) for k in keys):
        layers = _max_index(set(keys), HF_LAYERS)
        _check_depth(name, layers)
        if layers > 30:
            return _Encoder("g", _hf_g(name, keys, source), name)
        return _Encoder("l", _hf_l(name, keys, source), name)
    raise CheckpointError(f"'{name}' is not a CLIP text encoder: {_what_else(keys)}")


def _check_depth(name: str, layers: int) -> None:
    # detect_te_model: a layer 30 is bigG (32 layers), a layer 22 is ViT-H (24 layers, SD2.x)
    if 22 < layers <= 30:
        raise CheckpointError(f"'{name}' is an OpenCLIP ViT-H text encoder (SD2.x); {SUPPORTED}")


def _what_else(keys: Iterable[str]) -> str:
    keyset = set(keys)
    if any(k.startswith(UNET_PREFIX) for k in keyset):
        return (
            "it is a full checkpoint; load it with Load Checkpoint (CheckpointLoaderSimple), or take its "
            "CLIP output"
        )
    if any(k.startswith("encoder.block.") or k.startswith("shared.") for k in keyset):
        return f"it is a T5 text encoder (SD3/Flux and newer families); {SUPPORTED}"
    return convert._what_is_it(keyset).replace("; pick an SD1.x checkpoint", "")


def _hf_l(name: str, keys: list[str], source: TensorSource) -> Any:
    """CLIP-L in transformers' layout; `text_projection` and `logit_scale` are not used (SD1.x and
    SDXL read CLIP-L's hidden states only) and are left out, as ComfyUI's SD1ClipModel ignores them."""
    te_map = {
        k.removeprefix("text_model."): k
        for k in keys
        if k.startswith("text_model.") and not k.endswith("position_ids")
    }
    config = convert.clip_config(keys, source.shape, te_map)
    return build_text_encoder(config, te_map, source, name)


def _hf_g(name: str, keys: list[str], source: TensorSource) -> Any:
    """bigG in transformers' layout (`CLIPTextModelWithProjection` names). An old CLIPSave file keeps
    the projection as `text_projection` (x @ P), read transposed as ComfyUI does."""
    key_map = {k: k for k in keys if k.startswith("text_model.") and not k.endswith("position_ids")}
    if "text_projection.weight" in keys:
        key_map["text_projection.weight"] = "text_projection.weight"
    elif "text_projection" in keys:
        key_map["text_projection.weight"] = "text_projection#T"
    else:
        raise CheckpointError(
            f"'{name}' is a bigG text encoder without its text_projection; it is incomplete"
        )
    split = SplitSource(source)
    embed = split.shape("text_model.embeddings.token_embedding.weight")
    config = {
        "vocab_size": embed[0],
        "hidden_size": embed[1],
        "intermediate_size": split.shape(f"{HF_LAYERS}0.mlp.fc1.weight")[0],
        "num_hidden_layers": _max_index(set(keys), HF_LAYERS),
        "num_attention_heads": embed[1] // 64,
        "max_position_embeddings": split.shape("text_model.embeddings.position_embedding.weight")[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
        "projection_dim": split.shape(key_map["text_projection.weight"])[0],
    }
    return build_text_encoder_g(config, key_map, split, name)


def _open_clip_g(name: str, keys: list[str], source: TensorSource) -> Any:
    """bigG in open_clip's layout (no prefix): the checkpoint loader's map with an empty prefix."""
    split = SplitSource(source)
    config = convert_sdxl.clip_g_config(keys, "", source.shape)
    key_map = convert_sdxl.clip_g_key_map(keys, "")
    return build_text_encoder_g(config, key_map, split, name)
