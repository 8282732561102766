"""Load an SDXL-family checkpoint (single SGM file or diffusers folder) into diffusers/transformers modules.

Same discipline as nodes/sd/checkpoint.py: modules built on the meta device, weights assigned one
tensor at a time. UNet and VAE fp32; CLIP-L (`CLIPTextModel`) and bigG (`CLIPTextModelWithProjection`)
hold fp16-rounded values in fp32 storage (ComfyUI stores text encoders in fp16, computes in fp32).
The refiner has no CLIP-L: its `text_encoder` is None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nodes.sd import convert, convert_sdxl
from nodes.sd.checkpoint import (
    _LDM_NAMES,
    CheckpointError,
    LoadedCheckpoint,
    SafetensorsSource,
    TensorSource,
    _to_fp16_rounded,
    assign_weights,
    build_text_encoder,
    build_unet,
    build_vae,
    layout_errors,
    local_options,
    read_json,
)

SDXL_HEAD_CHANNELS = 64  # SDXL's attention heads are 64 channels wide at every level


class SplitSource:
    """A source that also serves `key#q|k|v` (a third of the rows) and `key#T` (transposed) views.

    The last fused tensor read is kept, so q, k and v of one layer cost one read of the file.
    """

    def __init__(self, inner: TensorSource) -> None:
        self.inner = inner
        self._last: tuple[str, torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return self.inner.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return convert_sdxl.view_shape(key, self.inner.shape)

    def get(self, key: str) -> torch.Tensor:
        base, _, view = key.partition("#")
        if not view:
            return self.inner.get(key)
        if self._last is None or self._last[0] != base:
            self._last = (base, self.inner.get(base))
        tensor = self._last[1]
        if view == "T":
            return tensor.t().contiguous()
        rows = tensor.shape[0] // 3
        part = convert_sdxl.SPLIT.index(view)
        return tensor[part * rows : (part + 1) * rows].clone()


def load_sdxl(path: Path, source: TensorSource) -> LoadedCheckpoint:
    """An SDXL base or refiner single file (`path` for messages, `source` its tensors)."""
    keys = source.keys()
    split = SplitSource(source)
    with layout_errors(path.name, "SDXL checkpoint"):
        family = convert_sdxl.detect_family(path.name, keys, source.shape)
        unet_cfg = convert.unet_config(path.name, keys, source.shape, SDXL_HEAD_CHANNELS)
        unet_map = convert.unet_key_map(keys, source.shape, unet_cfg)
        vae_map = convert.vae_key_map(keys, source.shape)
        vae_cfg = convert.vae_config(path.name, source.shape) | {
            "scaling_factor": convert_sdxl.SDXL_LATENT_SCALE
        }
        g_prefix = convert_sdxl.clip_g_prefix(family)
        g_map = convert_sdxl.clip_g_key_map(keys, g_prefix)
        g_cfg = convert_sdxl.clip_g_config(keys, g_prefix, source.shape)
        l_map = convert_sdxl.clip_l_key_map(keys) if family == "sdxl" else {}
        l_cfg = convert.clip_config(keys, source.shape, l_map) if l_map else None
    with torch.inference_mode(False):
        unet = build_unet(unet_cfg, unet_map, source, path.name)
        vae = build_vae(vae_cfg, vae_map, source, path.name)
        te_l = build_text_encoder(l_cfg, l_map, source, path.name) if l_cfg is not None else None
        te_g = build_text_encoder_g(g_cfg, g_map, split, path.name)
    parts: list[tuple[str, Any, dict[str, str]]] = [("unet", unet, unet_map), ("vae", vae, vae_map)]
    if te_l is not None:
        parts.append(("te", te_l, l_map))
    parts.append(("te2", te_g, g_map))
    ldm_keys: dict[str, tuple[str, str]] = {}
    for component, module, mapping in parts:
        ldm_keys |= {ldm: (component, p) for p, ldm in mapping.items()}
        _LDM_NAMES[module] = {ldm: p for p, ldm in mapping.items()}
    meta = source.metadata() if isinstance(source, SafetensorsSource) else {}
    return LoadedCheckpoint(path, family, unet, te_l, vae, ldm_keys, meta, text_encoder_2=te_g)


def build_text_encoder_g(
    config: dict[str, Any], key_map: dict[str, str], source: TensorSource, name: str
) -> Any:
    """bigG as a transformers `CLIPTextModelWithProjection` (fp16-rounded weights, fp32 storage)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        te = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    te = assign_weights(te, key_map, source, name, "OpenCLIP bigG text encoder", _to_fp16_rounded)
    positions = config["max_position_embeddings"]
    te.text_model.embeddings.register_buffer(
        "position_ids", torch.arange(positions).expand((1, -1)), persistent=False
    )
    return te


def load_sdxl_folder(path: Path) -> LoadedCheckpoint:
    """A diffusers SDXL folder: `unet/`, `vae/`, `text_encoder_2/` and (base only) `text_encoder/`.

    Read from disk only (`local_files_only`); the refiner's folder has no `text_encoder/`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for sub in ("unet", "vae", "text_encoder_2"):
        if not (path / sub / "config.json").is_file():
            raise CheckpointError(f"'{path.name}' is not a diffusers folder: {sub}/config.json is missing")
    unet_cfg = read_json(path / "unet" / "config.json")
    adm = unet_cfg.get("projection_class_embeddings_input_dim")
    if unet_cfg.get("addition_embed_type") != "text_time" or adm not in (
        convert_sdxl.BASE_ADM,
        convert_sdxl.REFINER_ADM,
    ):
        raise CheckpointError(
            f"'{path.name}' has a text_encoder_2 but its UNet is not SDXL's (addition_embed_type "
            f"{unet_cfg.get('addition_embed_type')!r}, {adm} added channels)"
        )
    family = "sdxl" if adm == convert_sdxl.BASE_ADM else "sdxl_refiner"
    has_l = (path / "text_encoder" / "config.json").is_file()
    if family == "sdxl" and not has_l:
        raise CheckpointError(f"'{path.name}' is an SDXL base folder without text_encoder/ (CLIP-L)")
    try:
        with torch.inference_mode(False):
            unet = UNet2DConditionModel.from_pretrained(path / "unet", **local_options(path / "unet"))
            vae = AutoencoderKL.from_pretrained(path / "vae", **local_options(path / "vae"))
            te_g = CLIPTextModelWithProjection.from_pretrained(
                path / "text_encoder_2", **local_options(path / "text_encoder_2")
            )
            te_l = (
                CLIPTextModel.from_pretrained(path / "text_encoder", **local_options(path / "text_encoder"))
                if family == "sdxl"
                else None
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"'{path.name}': the diffusers folder cannot be loaded ({exc})") from exc
    # transformers types PreTrainedModel.to as a wrapped method mypy cannot call; all are nn.Modules
    modules: tuple[torch.nn.Module | None, ...] = (unet, vae, te_l, te_g)
    for module in modules:
        if module is not None:
            module.to(torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        for te in (te_l, te_g):
            for param in te.parameters() if te is not None else ():
                param.copy_(_to_fp16_rounded(param))
    # Old SDXL VAE configs say 0.13025 already; ComfyUI fixes the scale by family, so do we.
    vae.register_to_config(scaling_factor=convert_sdxl.SDXL_LATENT_SCALE)
    return LoadedCheckpoint(path, family, unet, te_l, vae, text_encoder_2=te_g)
