"""diffusers/transformers parameter names -> original single-file LDM checkpoint keys, for CheckpointSave.

The UNet map comes from `keymap.diffusers_to_ldm` (any depth); the VAE map is the SD VAE's fixed
layout, where the mid-block attention's linear projections are stored as 1x1 convolutions; the
text encoder keeps its Hugging Face names under `cond_stage_model.transformer.text_model.`.
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
    out: dict[str, torch.Tensor] = {}
    for name, p in unet.named_parameters():
        out[unet_key(name, unet.config)] = p.detach().to("cpu", dtype).contiguous()
    for name, p in text_encoder.named_parameters():
        out[te_key(name)] = p.detach().to("cpu", dtype).contiguous()
    levels = len(vae.config.block_out_channels)
    for name, p in vae.named_parameters():
        t = p.detach().to("cpu", dtype)
        if ".mid_block.attentions." in name and name.endswith(".weight") and t.dim() == 2:
            t = t[:, :, None, None]  # LDM stores these projections as 1x1 convs
        out[vae_key(name, levels)] = t.contiguous()
    return out
