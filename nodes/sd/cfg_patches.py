"""The CFG step with a MODEL's patches: ComfyUI's `cfg_function` (comfy/samplers.py) with its
`sampler_cfg_function` (RescaleCFG, PerpNeg: the last one set wins) and `sampler_post_cfg_function`s
(PAG, SelfAttentionGuidance: in node order), and SelfAttentionGuidance's attention capture.

Sources: comfy_extras/nodes_model_advanced.py (RescaleCFG), nodes_perpneg.py, nodes_pag.py,
nodes_sag.py. SAG, step by step as ComfyUI does it:

1. While the UNet predicts a batch holding the negative side (ComfyUI's `cond_or_uncond` 1), the
   middle block's first self-attention (`"middle", 0, 0`) runs as plain softmax attention and keeps
   the negative entry's attention probabilities [b·heads, hw, hw] (the last such call wins).
2. After CFG: the mask is where the attention a key position receives, averaged over heads and
   summed over queries, exceeds 1; it is reshaped to the middle block's grid and upsampled
   (nearest) to the latent; the negative prediction is Gaussian-blurred (9 taps, reflect) there.
3. The blurred prediction is re-noised (`degraded + x − uncond`) and predicted again with the
   negative conditioning; the result gains `(degraded − that) · scale`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from nodes.sd.unet_patches import (
    PerpNeg,
    PerturbedAttention,
    RescaleCFG,
    SelfAttention,
    active,
    perturbed_middle,
    rescale_cfg,
)

RECORDER_ATTR = "nodegraph_sag_recorder"


def perp_neg(
    pos: torch.Tensor, neg: torch.Tensor, empty: torch.Tensor, neg_scale: float, cfg: float
) -> torch.Tensor:
    """nodes_perpneg.perp_neg on denoised predictions: the negative's part perpendicular to the
    positive direction (both relative to the empty prompt) is pushed away from, times neg_scale."""
    p, n = pos - empty, neg - empty
    perp: torch.Tensor = n - ((torch.mul(n, p).sum()) / (torch.norm(p) ** 2)) * p
    return empty + cfg * (p - perp * neg_scale)


def gaussian_blur_2d(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """nodes_sag.gaussian_blur_2d: a separable Gaussian as one 2D kernel per channel, reflect padding."""
    half = (kernel_size - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=kernel_size) / sigma).pow(2))
    taps = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    kernel = torch.mm(taps[:, None], taps[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(img, [pad] * 4, mode="reflect"), kernel, groups=img.shape[-3])


def _grid(total: int, height: int, width: int) -> tuple[int, int]:
    """The attention map's rows and columns: the divisor of `total` nearest the latent's aspect."""
    x = round(math.sqrt((height / width) * total))
    for i in range(math.floor(math.sqrt(total) / 2)):
        for j in (x + i, max(1, x - i)):
            if total % j == 0:
                return j, total // j
    raise ValueError(f"SelfAttentionGuidance: no grid fits an attention map of {total} positions")


def create_blur_map(
    x0: torch.Tensor, attn: torch.Tensor, sigma: float, threshold: float = 1.0
) -> torch.Tensor:
    """nodes_sag.create_blur_map: x0 blurred where the attention map says the model looks."""
    _, hw1, hw2 = attn.shape
    b, _, height, width = x0.shape
    mask = attn.reshape(b, -1, hw1, hw2).mean(1).sum(1) > threshold
    rows, cols = _grid(mask.shape[-1], height, width)
    mask = F.interpolate(mask.reshape(b, rows, cols).unsqueeze(1).to(attn.dtype), (height, width))
    return gaussian_blur_2d(x0, kernel_size=9, sigma=sigma) * mask + x0 * (1 - mask)


class AttentionRecorder:
    """The middle block's first attn1, as ComfyUI's attn_and_record: plain attention that keeps the
    negative side's probabilities when the batch holds it (`sides`: each batch entry's side)."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.sides: list[int] = []
        self.scores: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if 1 not in self.sides or kwargs.get("encoder_hidden_states") is not None:
            out: torch.Tensor = self.original(attn, hidden_states, *args, **kwargs)
            return out
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        batch, tokens, inner = q.shape
        heads, dim_head = attn.heads, inner // attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return (
                t.reshape(batch, -1, heads, dim_head).permute(0, 2, 1, 3).reshape(batch * heads, -1, dim_head)
            )

        sim = torch.einsum("b i d, b j d -> b i j", split(q), split(k)) * dim_head**-0.5
        sim = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", sim.to(v.dtype), split(v))
        out = out.reshape(batch, heads, -1, dim_head).permute(0, 2, 1, 3).reshape(batch, -1, inner)
        n_slices = heads * (batch // len(self.sides))
        index = self.sides.index(1)
        self.scores = sim[n_slices * index : n_slices * (index + 1)]
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / float(attn.rescale_output_factor)


@contextmanager
def recording_middle_attention(unet: Any, wanted: bool) -> Iterator[None]:
    """SAG's recorder on the middle block's first self-attention for one sampling run."""
    if not wanted:
        yield
        return
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    saved = layer.processor
    recorder = AttentionRecorder(saved)
    layer.set_processor(recorder)
    setattr(unet, RECORDER_ATTR, recorder)
    try:
        yield
    finally:
        delattr(unet, RECORDER_ATTR)
        layer.set_processor(saved)


def batch_sides(unet: Any, sides: list[int]) -> None:
    """Tell SAG's recorder which side each entry of the next UNet batch belongs to."""
    recorder = getattr(unet, RECORDER_ATTR, None)
    if recorder is not None:
        recorder.sides = sides


def needs_uncond(unet: Any) -> bool:
    """SAG runs the negative side even at cfg 1 (ComfyUI's disable_cfg1_optimization)."""
    return any(isinstance(p, SelfAttention) for p in active(unet))


@dataclass(frozen=True)
class Passes:
    """Extra UNet passes the patches may ask for, at this step's x and sigma."""

    cond: Callable[[], torch.Tensor]  # the positive side alone (PAG, inside its perturbed block)
    uncond_at: Callable[[torch.Tensor], torch.Tensor] | None = None  # the negative side at another x (SAG)
    extra: Callable[[Any], torch.Tensor] | None = None  # a CONDITIONING as a negative side (PerpNeg)


def cfg_mix(
    unet: Any, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
    cfg: float, passes: Passes,
) -> torch.Tensor:  # fmt: skip
    """cfg_function's mix: the last CFG patch (RescaleCFG, PerpNeg), else plain CFG."""
    mixes = [p for p in active(unet) if isinstance(p, (RescaleCFG, PerpNeg))]
    if uncond is None and not any(isinstance(p, PerpNeg) for p in mixes[-1:]):
        return cond
    if not mixes:
        assert uncond is not None
        return uncond + (cond - uncond) * cfg
    last = mixes[-1]
    if isinstance(last, PerpNeg):
        if passes.extra is None:
            raise ValueError("PerpNeg: this guider cannot run the empty conditioning's pass")
        negative = uncond if uncond is not None else torch.zeros_like(cond)  # a skipped pass is zeros
        return perp_neg(cond, negative, passes.extra(last.empty), last.neg_scale, cfg)
    assert uncond is not None
    return rescale_cfg(last.multiplier, x, sigma, cond, uncond, cfg)


def post_cfg(
    unet: Any, x: torch.Tensor, result: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
    passes: Passes,
) -> torch.Tensor:  # fmt: skip
    """Each sampler_post_cfg_function in node order: PAG's perturbed pass, SAG's blurred pass."""
    for patch in active(unet):
        if isinstance(patch, PerturbedAttention) and patch.scale != 0:
            with perturbed_middle(unet):
                pag = passes.cond()
            result = result + (cond - pag) * patch.scale
        elif isinstance(patch, SelfAttention):
            recorder = getattr(unet, RECORDER_ATTR, None)
            scores = recorder.scores if recorder is not None else None
            if min(result.shape[2:]) <= 4 or uncond is None or scores is None or passes.uncond_at is None:
                continue  # too small to pad (ComfyUI's skip), or no negative pass to learn from
            degraded = create_blur_map(uncond, scores, patch.blur_sigma)
            sag = passes.uncond_at(degraded + x - uncond)
            result = result + (degraded - sag) * patch.scale
    return result


def guided(
    unet: Any, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
    cfg: float, passes: Passes | Callable[[], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """cfg_function with the run's patches: the CFG mix, then the post-CFG steps. `uncond` None: the
    cfg-1 shortcut (cond alone). `passes` may be the positive-only pass alone (PAG's)."""
    if not isinstance(passes, Passes):
        passes = Passes(passes)
    result = cfg_mix(unet, x, sigma, cond, uncond, cfg, passes)
    return post_cfg(unet, x, result, cond, uncond, passes)
