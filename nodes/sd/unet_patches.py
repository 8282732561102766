"""Model patches a MODEL handle carries as data (like its LoRAs) and the sampler applies while it runs:
FreeU / FreeU_V2 (comfy_extras/nodes_freelunch.py), RescaleCFG (nodes_model_advanced.py) and
PerturbedAttentionGuidance (nodes_pag.py), with ComfyUI's numbers.

* FreeU acts where ComfyUI's `output_block_patch` does: on each output block's incoming h and its
  skip connection hsp, before they are concatenated. In diffusers that concat is the input of each
  up-block resnet, so a forward pre-hook on the resnet splits it (h's width = the resnet's input
  width minus the skip's, the skips counted off the down path as ComfyUI's `hs` stack is) and
  applies the patch. Which blocks: those whose h has 4·model_channels (b1, s1) or 2·model_channels
  (b2, s2) channels, ComfyUI's rule (not diffusers' per-resolution one).
* RescaleCFG replaces the CFG mix (`sampler_cfg_function`); PAG is a post-CFG step
  (`sampler_post_cfg_function`) with one more cond-only pass whose middle-block self-attention
  returns v (projections and to_out kept).

`applied(unet, patches)` installs the hooks for one sampling run and removes them after; the
denoiser reads the CFG patches from the UNet meanwhile (`active`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

PATCHES_ATTR = "nodegraph_patches"


@dataclass(frozen=True)
class FreeU:
    """FreeU (v2=False) or FreeU_V2: backbone factors b1, b2 and skip factors s1, s2."""

    b1: float
    b2: float
    s1: float
    s2: float
    v2: bool


@dataclass(frozen=True)
class RescaleCFG:
    """RescaleCFG's multiplier."""

    multiplier: float


@dataclass(frozen=True)
class PerturbedAttention:
    """PerturbedAttentionGuidance's scale."""

    scale: float


@dataclass(frozen=True)
class SelfAttention:
    """SelfAttentionGuidance's scale and blur sigma (nodes/sd/cfg_patches.py)."""

    scale: float
    blur_sigma: float


@dataclass(frozen=True, eq=False)
class PerpNeg:
    """PerpNeg's empty conditioning (a CONDITIONING value) and negative scale: a CFG mix."""

    empty: Any
    neg_scale: float


@dataclass(frozen=True)
class DifferentialDiffusion:
    """DifferentialDiffusion's strength: the inpainting noise mask thresholded per step."""

    strength: float


Patch = FreeU | RescaleCFG | PerturbedAttention | SelfAttention | PerpNeg | DifferentialDiffusion


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """nodes_freelunch.Fourier_filter: the centre 2·threshold square of the shifted spectrum × scale."""
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    b, c, h, w = x_freq.shape
    mask = torch.ones((b, c, h, w), device=x.device)
    crow, ccol = h // 2, w // 2
    mask[..., crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = scale
    x_freq = torch.fft.ifftshift(x_freq * mask, dim=(-2, -1))
    filtered: torch.Tensor = torch.fft.ifftn(x_freq, dim=(-2, -1)).real
    return filtered.to(x.dtype)


def freeu_output_block(
    patch: FreeU, model_channels: int, h: torch.Tensor, hsp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's output_block_patch of FreeU / FreeU_V2 for one output block."""
    scale = {model_channels * 4: (patch.b1, patch.s1), model_channels * 2: (patch.b2, patch.s2)}.get(
        int(h.shape[1])
    )
    if scale is None:
        return h, hsp
    h = h.clone()
    half = h.shape[1] // 2
    if patch.v2:
        mean = h.mean(1).unsqueeze(1)
        batch = mean.shape[0]
        top = torch.max(mean.view(batch, -1), dim=-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
        bottom = torch.min(mean.view(batch, -1), dim=-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
        mean = (mean - bottom) / (top - bottom)
        h[:, :half] = h[:, :half] * ((scale[0] - 1) * mean + 1)
    else:
        h[:, :half] = h[:, :half] * scale[0]
    return h, fourier_filter(hsp, threshold=1, scale=scale[1])


def _skip_widths(unet: Any) -> list[int]:
    """The channel count of each skip connection in the order the down path pushes them."""
    widths = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        widths += [resnet.conv2.out_channels for resnet in block.resnets]
        widths += [sampler.conv.out_channels for sampler in block.downsamplers or ()]
    return widths


def _freeu_hooks(unet: Any, patches: Sequence[FreeU]) -> list[Any]:
    """Pre-hooks on every up-block resnet that apply the FreeU patches to (h, skip) before the concat."""
    model_channels = unet.config.block_out_channels[0]
    skips = _skip_widths(unet)
    handles = []
    for block in unet.up_blocks:
        for resnet in block.resnets:
            width = resnet.conv1.in_channels - skips.pop()

            def hook(module: Any, args: tuple[Any, ...], width: int = width) -> tuple[Any, ...]:
                h, hsp = args[0][:, :width], args[0][:, width:]
                for patch in patches:
                    h, hsp = freeu_output_block(patch, model_channels, h, hsp)
                return (torch.cat([h, hsp], dim=1), *args[1:])

            handles.append(resnet.register_forward_pre_hook(hook))
    return handles


@contextmanager
def applied(unet: Any, patches: Sequence[Patch]) -> Iterator[Any]:
    """The UNet with these patches in effect (FreeU hooks installed, CFG patches readable by the
    denoiser through `active`) for one sampling run; removed afterwards, also on errors."""
    if not patches:
        yield unet
        return
    from nodes.sd.cfg_patches import recording_middle_attention

    handles = _freeu_hooks(unet, [p for p in patches if isinstance(p, FreeU)])
    setattr(unet, PATCHES_ATTR, tuple(patches))
    try:
        with recording_middle_attention(unet, any(isinstance(p, SelfAttention) for p in patches)):
            yield unet
    finally:
        delattr(unet, PATCHES_ATTR)
        for handle in handles:
            handle.remove()


def active(unet: Any) -> tuple[Patch, ...]:
    """The patches of the sampling run this UNet is in (empty outside `applied`)."""
    found: tuple[Patch, ...] = getattr(unet, PATCHES_ATTR, ())
    return found


def rescale_cfg(
    multiplier: float,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    cfg: float,
) -> torch.Tensor:
    """RescaleCFG's sampler_cfg_function, returned as the denoised prediction (x − its result).

    `cond` and `uncond` are the denoised predictions; ComfyUI hands the function x − each.
    """
    s = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
    c_arg, u_arg = x - cond, x - uncond
    xs = x / (s * s + 1.0)
    # rescaling works on the v-prediction output
    c_v = ((xs - (x - c_arg)) * (s**2 + 1.0) ** 0.5) / s
    u_v = ((xs - (x - u_arg)) * (s**2 + 1.0) ** 0.5) / s
    x_cfg = u_v + cfg * (c_v - u_v)
    ro_pos = torch.std(c_v, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_final = multiplier * (x_cfg * (ro_pos / ro_cfg)) + (1.0 - multiplier) * x_cfg
    return x - (x - (xs - x_final * s / (s * s + 1.0) ** 0.5))


class _VAsAttention:
    """PAG's attention replacement: softmax(qkᵀ)v becomes v; q, k, v and to_out run as usual."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = attn.to_v(hidden_states)
        out: torch.Tensor = attn.to_out[1](attn.to_out[0](value))
        if attn.residual_connection:
            out = out + hidden_states
        return out / float(attn.rescale_output_factor)


@contextmanager
def perturbed_middle(unet: Any) -> Iterator[None]:
    """The middle block's self-attentions (attn1) replaced by PAG's for one pass."""
    layers = [
        block.attn1 for attention in unet.mid_block.attentions for block in attention.transformer_blocks
    ]
    saved = [layer.processor for layer in layers]
    for layer in layers:
        layer.set_processor(_VAsAttention())
    try:
        yield
    finally:
        for layer, processor in zip(layers, saved, strict=True):
            layer.set_processor(processor)
