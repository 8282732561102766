"""Load ControlNet files (the UNet's encoder half plus a hint encoder) as diffusers `ControlNetModel`s.

Sources: comfy/controlnet.py `load_controlnet` (format detection), comfy/model_detection.py (the
config from key shapes, as for a checkpoint's UNet) and comfy/cldm/cldm.py (the network). The
original layout (`zero_convs.*`, `input_hint_block.*`, with or without A1111's `control_model.`
prefix) is renamed with diffusers' own converter, run on key references like the checkpoint loader
(nodes/sd/convert.py), so weights are read one tensor at a time. The config is read from shapes by
`convert.unet_config`, the checkpoint UNet's: the ControlNet is built exactly like the UNet it
steers, which is why its numbers are the UNet's (diffusers' blocks, ComfyUI's arithmetic).

Files in diffusers' layout (a diffusers ControlNet folder's .safetensors, SD1.x or SDXL such as
controlnet-canny-sdxl-1.0) are read with their own names (nodes/sd/controlnet_diffusers.py reads
their config). Diff ControlNets (`difference` key) hold weights relative to a base UNet: the model's
UNet weights are added to them (ComfyUI's DiffControlNetLoader). Control LoRAs (`lora_controlnet`
key) are read here and built against the sampled UNet (nodes/sd/control_lora.py). A file with none
of those keys is tried as a T2I-Adapter, as ComfyUI does (nodes/sd/t2i_adapter.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.sd import controlnet_diffusers as diffusers_layout
from nodes.sd import convert
from nodes.sd.checkpoint import (
    CheckpointError,
    TensorSource,
    _to_fp32,
    assign_weights,
    layout_errors,
    ldm_names,
    open_source,
)
from nodes.sd.convert import UNET_PREFIX
from nodes.sd.t2i_adapter import AdapterSpec, build_adapter, is_adapter, is_cascade

PREFIXES = ("control_model.", "")  # A1111-extracted files, then the plain original layout
MARKER = "zero_convs.0.0.weight"
CONTROL_LORA_MARKER = "lora_controlnet"  # Stability's control-lora files, ComfyUI's ControlLoraSave
HINT = "input_hint_block."
SDXL_HEAD_CHANNELS = 64


class ControlNetError(CheckpointError):
    """A file that is not a ControlNet nodegraph can run (the message says what it is instead)."""


class ControlLoraWeights:
    """A control LoRA's tensors as stored (`lora_controlnet` marker dropped): full tensors in the
    original ControlNet names, and `<module>.up` / `<module>.down` pairs for weights that differ from
    the UNet's by a low-rank product. A plain class, like a network: the ControlNet store bounds it,
    the output cache does not count it (nodegraph/cache.py walks dataclasses)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors


@dataclass(frozen=True, eq=False)
class ControlModel:
    """A loaded ControlNet: the diffusers network (fp32, eval) and what it was made for. A control
    LoRA has no network of its own (`net` None): it is built against the sampled UNet. A T2I-Adapter's
    `net` is the adapter (`adapter` its structure)."""

    net: Any
    name: str
    family: str  # "sd15" or "sdxl"
    context_dim: int  # the text width of its family's models (768 SD1.x, 2048 SDXL): what it fits
    lora: ControlLoraWeights | None = None
    adapter: AdapterSpec | None = None

    @property
    def kind(self) -> str:
        return "T2I-Adapter" if self.adapter else "control LoRA" if self.lora else "ControlNet"


class _Stripped:
    """A source seen without `prefix` (keys outside it hidden), shapes and tensors read lazily."""

    def __init__(self, inner: TensorSource, prefix: str, add: dict[str, torch.Tensor] | None = None) -> None:
        self.inner, self.prefix, self.add = inner, prefix, add or {}
        self._keys = [k[len(prefix) :] for k in inner.keys() if k.startswith(prefix)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.inner.shape(self.prefix + key)

    def get(self, key: str) -> torch.Tensor:
        tensor = self.inner.get(self.prefix + key)
        base = self.add.get(key)
        # ComfyUI adds the base in the file's dtype (`cd += model_sd[k].type(cd.dtype)`)
        return tensor if base is None else tensor + base.to(tensor.dtype)


def what_else(name: str, keys: Iterable[str]) -> str:
    """Why a file without ControlNet keys cannot be used, naming what it looks like."""
    keyset = set(keys)
    if is_cascade(keyset):
        return (
            f"'{name}' is a Stable Cascade ControlNet; nodegraph runs SD1.x and SDXL ControlNets and "
            "T2I-Adapters"
        )
    if any(
        k.startswith(("controlnet_x_embedder.", "pos_embed_input.", "controlnet_blocks.")) for k in keyset
    ):
        return f"'{name}' is an SD3/Flux/HunyuanDiT ControlNet; nodegraph runs SD1.x and SDXL ControlNets"
    what = convert._what_is_it(keyset) if not any(k.startswith(UNET_PREFIX) for k in keyset) else ""
    if any(k.startswith(UNET_PREFIX) for k in keyset):
        what = "it is a checkpoint (a whole model); put it in models/checkpoints"
    return f"'{name}' is not a ControlNet (no zero_convs.* keys): {what}"


def _prefix(keys: list[str]) -> str | None:
    for prefix in PREFIXES:
        if prefix + MARKER in keys:
            return prefix
    return None


def _hint_channels(source: TensorSource, name: str) -> tuple[int, tuple[int, ...]]:
    """(hint image channels, diffusers' conditioning_embedding_out_channels) from the hint convs."""
    convs = sorted(
        int(k[len(HINT) :].split(".")[0])
        for k in source.keys()
        if k.startswith(HINT) and k.endswith(".weight")
    )
    # conv_in, then (same width, stride-2 wider) pairs, then conv_out: SiLU between each (cldm.py)
    if len(convs) < 2 or len(convs) % 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise ControlNetError(
            f"'{name}': its hint encoder ({HINT}*) has an unknown layout; it cannot be built"
        )
    widths = [source.shape(f"{HINT}{i}.weight")[0] for i in convs]
    return source.shape(f"{HINT}0.weight")[1], (widths[0], *widths[2:-1:2])


def controlnet_config(source: TensorSource, name: str) -> dict[str, Any]:
    """A `ControlNetModel` config: the checkpoint UNet's rules (convert.unet_config) on its keys."""
    keys = [UNET_PREFIX + k for k in source.keys()] + [UNET_PREFIX + "out.2.weight"]

    def shape_of(key: str) -> tuple[int, ...]:
        if key == UNET_PREFIX + "out.2.weight":
            return (4,)  # a ControlNet has no output half; unet_config reads out_channels from here
        return source.shape(key[len(UNET_PREFIX) :])

    sdxl = "label_emb.0.0.weight" in source.keys()
    unet = convert.unet_config(name, keys, shape_of, SDXL_HEAD_CHANNELS if sdxl else None)
    hint_channels, embedding = _hint_channels(source, name)
    config = {k: unet[k] for k in (
        "in_channels", "block_out_channels", "layers_per_block", "down_block_types", "mid_block_type",
        "transformer_layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
        "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    ) if k in unet}  # fmt: skip
    return config | {"conditioning_channels": hint_channels, "conditioning_embedding_out_channels": embedding}


def controlnet_key_map(source: TensorSource, config: dict[str, Any]) -> dict[str, str]:
    """diffusers ControlNetModel parameter name -> original key (diffusers' converter on key references)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    refs = {k: convert._Ref(k, source.shape(k)) for k in source.keys()}
    converted = convert_controlnet_checkpoint(refs, {"layers_per_block": config["layers_per_block"]})
    out = {name: ref.key for name, ref in converted.items() if isinstance(ref, convert._Ref)}
    if config.get("addition_embed_type"):  # SDXL's size conditioning; the converter leaves it out
        names: dict[str, str] = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]  # type: ignore[index]
        out |= names
    return out


def load_controlnet(path: Path, base_unet: Any = None) -> ControlModel:
    """Load a ControlNet file; `base_unet` gives a diff ControlNet its base weights.

    Raises:
        ControlNetError: not a ControlNet (the message names what it is), another family, a broken file.
    """
    path = Path(path)
    source = open_source(path)
    keys = source.keys()
    if CONTROL_LORA_MARKER in keys:
        return _load_control_lora(path, source)
    if diffusers_layout.MARKER in keys:
        return _load_diffusers(path, source)
    prefix = _prefix(keys)
    if prefix is None and is_adapter(set(keys)):
        return _load_adapter(path, source)
    if prefix is None:
        raise ControlNetError(what_else(path.name, keys))
    base: dict[str, torch.Tensor] = {}
    if "difference" in keys and prefix:
        base = _base_weights(path.name, base_unet)
    stripped = _Stripped(source, prefix, base)
    with layout_errors(path.name, "ControlNet", ControlNetError):
        config = controlnet_config(stripped, path.name)
    return build_controlnet(path.name, config, controlnet_key_map(stripped, config), stripped)


def _load_control_lora(path: Path, source: TensorSource) -> ControlModel:
    """A control LoRA: its tensors kept as stored; family and text width read from its keys."""
    tensors = {k: source.get(k) for k in source.keys() if k != CONTROL_LORA_MARKER}
    if f"{HINT}0.weight" not in tensors or "zero_convs.0.0.weight" not in tensors:
        raise ControlNetError(
            f"'{path.name}' is a control LoRA without its hint encoder or zero convs; it is incomplete"
        )
    family = "sdxl" if any(k.startswith("label_emb.") for k in tensors) else "sd15"
    widths = [t.shape[-1] for k, t in tensors.items() if k.endswith("attn2.to_k.down") and t.dim() == 2]
    context = widths[0] if widths else (2048 if family == "sdxl" else 768)
    return ControlModel(None, path.name, family, int(context), ControlLoraWeights(tensors))


def _load_adapter(path: Path, source: TensorSource) -> ControlModel:
    """A T2I-Adapter: its network, and the family whose UNet its features are shaped for."""
    try:
        adapter = build_adapter(path.name, source)
    except CheckpointError as exc:
        raise ControlNetError(str(exc)) from exc
    spec = adapter.spec
    return ControlModel(adapter, path.name, spec.family, 2048 if spec.xl else 768, adapter=spec)


def _load_diffusers(path: Path, source: TensorSource) -> ControlModel:
    """A diffusers-layout ControlNet: parameter names are the file's keys."""
    keys = set(source.keys())
    try:
        config = diffusers_layout.diffusers_config(keys, source.shape)
    except (KeyError, IndexError, ValueError) as exc:
        raise ControlNetError(f"'{path.name}' is an incomplete diffusers-layout ControlNet ({exc})") from exc
    return build_controlnet(path.name, config, diffusers_layout.key_map(keys, config), source)


def build_controlnet(
    name: str, config: dict[str, Any], key_map: dict[str, str], source: TensorSource
) -> ControlModel:
    """A `ControlNetModel` of `config` with the weights `key_map` names in `source` (strict)."""
    from diffusers import ControlNetModel

    context = config["cross_attention_dim"]
    if context not in (768, 2048) or (context == 768 and config["use_linear_projection"]):
        raise ControlNetError(
            f"'{name}' is a ControlNet for another model family (text width {context}); nodegraph runs "
            "SD1.x and SDXL ControlNets"
        )
    with torch.inference_mode(False):
        with torch.device("meta"):
            net = ControlNetModel(**config)
        try:
            net = assign_weights(net, key_map, source, name, "ControlNet", _to_fp32)
        except CheckpointError as exc:
            raise ControlNetError(str(exc)) from exc
    family = "sdxl" if config.get("addition_embed_type") else "sd15"
    return ControlModel(net, name, family, int(context))


def _base_weights(name: str, unet: Any) -> dict[str, torch.Tensor]:
    """{ControlNet key: the model's UNet weight of the same name} for a diff ControlNet."""
    names = ldm_names(unet) if unet is not None else None
    if names is None:
        raise ControlNetError(
            f"'{name}' is a diff ControlNet: load it with DiffControlNetLoader and a model loaded from a "
            "single checkpoint file"
        )
    params = dict(unet.named_parameters())
    return {ldm[len(UNET_PREFIX) :]: params[p].detach() for ldm, p in names.items() if p in params}
