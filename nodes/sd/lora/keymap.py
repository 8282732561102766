"""LoRA key stems -> model module paths, for a diffusers UNet and a transformers CLIP text encoder.

A LoRA file names each adapted layer by a *stem* (`lora_unet_down_blocks_0_..._to_q`,
`unet.mid_block.attentions.0.proj_in`, `lora_te_text_model_encoder_layers_3_mlp_fc1`, ...).
The maps here are built forward, from the model's own module names, so a stem either matches a
real module or is reported as unmatched; nothing is guessed by splitting on `_`.

The LDM (original Stable Diffusion) UNet names are derived from the diffusers UNet config, so the
map works for any depth (number of levels, res blocks per level, which levels have attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's added (pooled text + size) embedding: `label_emb.0` is a Sequential(Linear, SiLU, Linear).
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def module_params(module: Any) -> Iterator[tuple[str, list[str]]]:
    """(module path, names of its own parameters) for every module that holds parameters."""
    for name, sub in module.named_modules():
        own = [p for p, _ in sub.named_parameters(recurse=False)]
        if own and name:
            yield name, own


def _layers_per_block(config: Any, levels: int) -> list[int]:
    lpb = config.layers_per_block
    return list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * levels


def _resnet_tail(rest: str) -> str | None:
    head, _, tail = rest.partition(".")
    part = _RESNET_PARTS.get(head)
    return None if part is None else (part + ("." + tail if tail else ""))


def diffusers_to_ldm(path: str, config: Any) -> str | None:
    """The original-LDM module path of a diffusers UNet module path (None when it has none).

    Down level L starts at input block 1 + Σ(res blocks + 1) of the levels before it; up block U
    (diffusers counts from the deepest level) likewise in output blocks; the up sampler sits in the
    last block of a level after the resnet and, when the level has attention, the transformer.
    """
    if path in _FIXED:
        return _FIXED[path]
    for prefix, ldm in _FIXED.items():
        if path.startswith(prefix + "."):
            return ldm + path[len(prefix) :]
    parts = path.split(".")
    down_types = list(config.down_block_types)
    levels = len(down_types)
    lpb = _layers_per_block(config, levels)
    if parts[0] == "down_blocks" and len(parts) >= 4:
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        start = 1 + sum(n + 1 for n in lpb[:level])
        if kind == "resnets":
            tail = _resnet_tail(rest)
            return None if tail is None else f"input_blocks.{start + j}.0.{tail}"
        if kind == "attentions":
            return f"input_blocks.{start + j}.1" + ("." + rest if rest else "")
        if kind == "downsamplers" and rest.startswith("conv"):
            return f"input_blocks.{start + lpb[level]}.0.op" + rest[len("conv") :]
        return None
    if parts[0] == "mid_block" and len(parts) >= 3:
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            tail = _resnet_tail(rest)
            return None if tail is None else f"middle_block.{2 * j}.{tail}"
        if kind == "attentions":
            return "middle_block.1" + ("." + rest if rest else "")
        return None
    if parts[0] == "up_blocks" and len(parts) >= 4:
        up, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        up_lpb = list(reversed(lpb))
        start = sum(n + 1 for n in up_lpb[:up])
        has_attn = "CrossAttn" in list(config.up_block_types)[up]
        if kind == "resnets":
            tail = _resnet_tail(rest)
            return None if tail is None else f"output_blocks.{start + j}.0.{tail}"
        if kind == "attentions":
            return f"output_blocks.{start + j}.1" + ("." + rest if rest else "")
        if kind == "upsamplers" and rest.startswith("conv"):
            sub = 2 if has_attn else 1
            return f"output_blocks.{start + up_lpb[up]}.{sub}.conv" + rest[len("conv") :]
    return None


def _processor_form(path: str) -> str | None:
    """The old diffusers attn-procs naming: `attn1.to_q` -> `attn1.processor.to_q`."""
    for proj in ("to_q", "to_k", "to_v"):
        if path.endswith("." + proj):
            return path[: -len(proj) - 1] + ".processor." + proj
    if path.endswith(".to_out.0"):
        return path[: -len(".to_out.0")] + ".processor.to_out"
    return None


def _peft_forms(path: str) -> tuple[str, str]:
    """A PEFT adapter saved from a wrapped diffusers UNet (`PeftModel.save_pretrained`,
    `get_peft_model_state_dict` of a `PeftModel`): `base_model.model.<path>`, and the old reference
    script's `unet.base_model.model.<path>` (ComfyUI reads both forms for PixArt only)."""
    return f"base_model.model.{path}", f"unet.base_model.model.{path}"


def unet_stems(unet: Any) -> dict[str, str]:
    """Every stem a LoRA may use for a UNet module -> the diffusers module path.

    ComfyUI's `model_lora_keys_unet` on SD1.x/SDXL reads kohya's `lora_unet_` (LDM and diffusers
    paths), SimpleTuner's `lycoris_`, the generic `diffusion_model.` and diffusers' `unet.` / bare
    paths, except that diffusers/PEFT attention projections (`attn1.to_q`, `to_out.0`) are read only
    in the old attn-procs form (`attn1.processor.to_q`): a diffusers-trained SDXL LoRA loses its
    attention layers there ("lora key not loaded"). Here every form names every module, so such a
    LoRA applies whole, as diffusers' own loader applies it; PEFT's `base_model.model.` adapters too.
    """
    config = getattr(unet, "config", None)
    stems: dict[str, str] = {}
    for path, _ in module_params(unet):
        flat = path.replace(".", "_")
        for stem in (f"lora_unet_{flat}", f"lycoris_{flat}", f"unet.{path}", path, *_peft_forms(path)):
            stems[stem] = path
        old = _processor_form(path)
        if old is not None:
            stems[old] = stems[f"unet.{old}"] = path
        ldm = diffusers_to_ldm(path, config) if config is not None else None
        if ldm is not None:
            for stem in (
                f"lora_unet_{ldm.replace('.', '_')}",
                f"diffusion_model.{ldm}",
                f"model.diffusion_model.{ldm}",
            ):
                stems[stem] = path
    return stems


# Which LoRA prefixes name which text encoder (ComfyUI's `model_lora_keys_clip`):
# "te" is CLIP-L (SD1.x, or SDXL's first encoder); "te2" is SDXL's OpenCLIP bigG beside a CLIP-L;
# "te_g" is a bigG alone (the SDXL refiner), which kohya and diffusers name like a first encoder.
_TE_PREFIXES = {
    "te": (("lora_te_", "lora_te1_"), ("text_encoder.",), "clip_l"),
    "te2": (("lora_te2_",), ("text_encoder_2.",), "clip_g"),
    "te_g": (("lora_te_", "lora_prior_te_"), ("text_encoder.",), "clip_g"),
}


def te_stems(text_encoder: Any, which: str = "te") -> dict[str, str]:
    """Every stem a LoRA may use for a CLIP text-encoder module -> the module path.

    `which`: "te" (CLIP-L), "te2" (SDXL's bigG) or "te_g" (the refiner's bigG alone). transformers
    >= 5 has no `text_model.` level in `CLIPTextModel`'s module names (it has in
    `CLIPTextModelWithProjection`'s, and older versions always do); the stems are built on the
    `text_model.`-qualified name either way, and bigG's `text_projection` sits outside it
    (`lora_te2_text_projection`, OneTrainer). Unlike ComfyUI, norms and every other module are
    mapped too, so LyCORIS `train_norm` TE keys apply.
    """
    flat_prefixes, dotted_prefixes, generic = _TE_PREFIXES[which]
    stems: dict[str, str] = {}
    for path, _ in module_params(text_encoder):
        top = path.startswith("text_model.") or path == "text_projection"
        full = path if top else f"text_model.{path}"
        flat = full.replace(".", "_")
        names = [f"{p}{flat}" for p in flat_prefixes] + [f"{p}{full}" for p in dotted_prefixes]
        names += [f"text_encoders.{generic}.transformer.{full}", f"text_encoders.{generic}.{full}"]
        for stem in names:
            stems[stem] = path
    return stems
