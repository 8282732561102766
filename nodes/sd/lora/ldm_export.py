"""diffusers/transformers parameter names -> original single-file LDM/SGM checkpoint keys, for CheckpointSave.

The UNet map comes from `keymap.diffusers_to_ldm` (any depth, SDXL's `label_emb` included); the VAE
map is the SD VAE's fixed layout, where the mid-block attention's linear projections are stored as
1x1 convolutions. SD1.x's text encoder keeps its Hugging Face names under
`cond_stage_model.transformer.text_model.`; SDXL (SGM layout) puts CLIP-L under
`conditioner.embedders.0.transformer.text_model.` and OpenCLIP bigG back in open_clip's names under
`conditioner.embedders.1.model.` (the refiner: `embedders.0.model.`): q, k, v fused into
`attn.in_proj_*`, and `text_projection` stored transposed (open_clip computes `x @ P`).
"""

from __future__ import annotations

from typing import Any

import torch

from nodes.sd.lora.keymap import diffusers_to_ldm

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = "cond_stage_model.transformer.text_model."
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_FIXED = {"conv_norm_out": "norm_out"}


class ExportError(ValueError):
    """A model parameter has no place in the original checkpoint layout."""


def unet_key(name: str, config: Any) -> str:
    module, _, param = name.rpartition(".")
    ldm = diffusers_to_ldm(module, config)
    if ldm is None:
        raise ExportError(f"UNet parameter {name} has no original-LDM name")
    return f"{UNET_PREFIX}{ldm}.{param}"


def _vae_mid(rest: str) -> str:
    kind, j, tail = rest.split(".", 2)
    if kind == "resnets":
        return f"mid.block_{int(j) + 1}.{tail}"
    module, _, param = tail.rpartition(".")
    return f"mid.attn_1.{_VAE_ATTN[module]}.{param}"


def vae_key(name: str, levels: int) -> str:
    """The LDM key of a diffusers AutoencoderKL parameter (`levels`: number of up/down blocks)."""
    side, _, rest = name.partition(".")
    if side not in ("encoder", "decoder"):
        return VAE_PREFIX + name  # quant_conv, post_quant_conv
    parts = rest.split(".")
    if parts[0] == "mid_block":
        return f"{VAE_PREFIX}{side}.{_vae_mid('.'.join(parts[1:]))}"
    if parts[0] in ("down_blocks", "up_blocks"):
        i = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
        group = "down" if parts[0] == "down_blocks" else "up"
        if parts[2] == "resnets":
            module = _VAE_RESNET.get(parts[4], parts[4])
            return f"{VAE_PREFIX}{side}.{group}.{i}.block.{parts[3]}.{module}.{parts[5]}"
        sampler = "downsample" if group == "down" else "upsample"
        return f"{VAE_PREFIX}{side}.{group}.{i}.{sampler}.{'.'.join(parts[4:])}"
    head = parts[0]
    return f"{VAE_PREFIX}{side}.{_VAE_FIXED.get(head, head)}.{'.'.join(parts[1:])}"


def te_key(name: str) -> str:
    return TE_PREFIX + (name[len("text_model.") :] if name.startswith("text_model.") else name)


def ldm_state_dict(
    unet: Any, text_encoder: Any, vae: Any, dtype: torch.dtype = torch.float16
) -> dict[str, Any]:
    """The three modules' current weights as an original SD1.x single-file state dict in `dtype`."""
    out = _unet_and_vae(unet, vae, dtype)
    for name, p in text_encoder.named_parameters():
        out[te_key(name)] = p.detach().to("cpu", dtype).contiguous()
    return out


SGM_CLIP_L = "conditioner.embedders.0.transformer.text_model."
_OPENCLIP = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_LOGIT_SCALE = 4.60517  # ln(100), as real SDXL files store it (unused for text conditioning)


def _openclip_key(name: str) -> str | None:
    """open_clip name of a transformers bigG parameter (None for q/k/v, which are fused)."""
    inner = name[len("text_model.") :] if name.startswith("text_model.") else name
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    if inner in fixed:
        return fixed[inner]
    parts = inner.split(".")  # encoder.layers.N.<module>.<param>
    if parts[:2] != ["encoder", "layers"]:
        raise ExportError(f"bigG parameter {name} has no open_clip name")
    module, param = ".".join(parts[3:-1]), parts[-1]
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return None
    return f"transformer.resblocks.{parts[2]}.{_OPENCLIP[module]}.{param}"


def openclip_state_dict(clip_g: Any, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A transformers `CLIPTextModelWithProjection` as open_clip keys under `prefix`, in `dtype`."""
    params = {n: p.detach() for n, p in clip_g.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = p.t().to("cpu", dtype).contiguous()
            continue
        key = _openclip_key(name)
        if key is not None:
            out[prefix + key] = p.to("cpu", dtype).contiguous()
        elif ".q_proj." in name:  # fuse q, k, v once, at q
            kind = name.rsplit(".", 1)[1]
            stem = name[: -len(f"q_proj.{kind}")]
            fused = torch.cat([params[f"{stem}{x}_proj.{kind}"] for x in "qkv"], dim=0)
            layer = name.split("encoder.layers.")[1].split(".")[0]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused.to("cpu", dtype)
    out[prefix + "logit_scale"] = torch.tensor(_LOGIT_SCALE, dtype=dtype)
    return out


def unet_state_dict(unet: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's current weights under their original-LDM keys (`model.diffusion_model.`...)."""
    return {
        unet_key(name, unet.config): p.detach().to("cpu", dtype).contiguous()
        for name, p in unet.named_parameters()
    }


def vae_state_dict(vae: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The VAE's current weights under their original-LDM keys (`first_stage_model.`...)."""
    out: dict[str, torch.Tensor] = {}
    levels = len(vae.config.block_out_channels)
    for name, p in vae.named_parameters():
        t = p.detach().to("cpu", dtype)
        if ".mid_block.attentions." in name and name.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # LDM stores these projections as 1x1 convs
        out[vae_key(name, levels)] = t.contiguous()
    return out


def _unet_and_vae(unet: Any, vae: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return unet_state_dict(unet, dtype) | vae_state_dict(vae, dtype)


def sgm_state_dict(
    unet: Any, clip_l: Any, clip_g: Any, vae: Any, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """An SDXL (SGM layout) single-file state dict; `clip_l` None for the refiner (bigG at embedders.0)."""
    out = _unet_and_vae(unet, vae, dtype)
    if clip_l is not None:
        for name, p in clip_l.named_parameters():
            inner = name[len("text_model.") :] if name.startswith("text_model.") else name
            out[SGM_CLIP_L + inner] = p.detach().to("cpu", dtype).contiguous()
    g_prefix = "conditioner.embedders.1.model." if clip_l is not None else "conditioner.embedders.0.model."
    out |= openclip_state_dict(clip_g, g_prefix, dtype)
    return out
