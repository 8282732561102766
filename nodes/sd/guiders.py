"""Guiders: what a sampler's model call predicts, from which conditioning (the GUIDER socket).

Sources: comfy/samplers.py `CFGGuider` and comfy_extras/nodes_custom_sampler.py `Guider_Basic`,
`Guider_DualCFG`. A guide is a value (conditioning and scales); `denoiser(...)` builds the
callable the sampler uses, once the UNet, its device and the latent are known.

* `CFGGuide`: KSampler's guidance, `uncond + (cond − uncond)·cfg`.
* `BasicGuide`: the positive only (cfg 1, no uncond pass).
* `DualCFGGuide`: three sides run in ComfyUI's order [negative, middle, positive];
  regular: `cfg(middle, negative, cfg2) + (positive − middle)·cfg1` (with ComfyUI's cfg-1
  shortcuts: cfg2 ≈ 1 drops the negative pass, and cfg1 ≈ 1 too drops the middle one, unless SAG
  needs the passes); nested: `negative + cfg2·(cfg(positive, middle, cfg1) − negative)`. `cfg` is
  ComfyUI's `cfg_function`, so the MODEL's CFG patches (RescaleCFG, PerpNeg, PAG, SAG) apply to
  it with those two sides as cond and uncond, as in ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nodes.sd import cfg_patches, unet_patches
from nodes.sd.cond_entries import CondEntry, entries_for
from nodes.sd.guidance import CFGDenoiser, ConcatFor
from nodes.sd.model_sampling import ModelSampling


class Guide(Protocol):
    """A GUIDER value: builds the sampler's denoiser for one UNet."""

    def denoiser(
        self,
        unet: Any,
        sampling: ModelSampling,
        device: torch.device,
        keep_uncond: bool,
        concat_for: ConcatFor | None,
    ) -> CFGDenoiser:
        """The denoiser (x, sigma) -> guided x0 prediction."""


@dataclass(frozen=True)
class CFGGuide:
    """CFGGuider: positive and negative conditioning mixed with one cfg scale."""

    positive: Any
    negative: Any
    cfg: float

    def denoiser(
        self,
        unet: Any,
        sampling: ModelSampling,
        device: torch.device,
        keep_uncond: bool,
        concat_for: ConcatFor | None,
    ) -> CFGDenoiser:
        schedule = sampling.schedule
        return CFGDenoiser(
            unet,
            schedule,
            entries_for(self.positive, device, schedule, "positive", unet),
            entries_for(self.negative, device, schedule, "negative", unet),
            self.cfg,
            keep_uncond=keep_uncond,
            concat_for=concat_for,
            sampling=sampling,
        )


@dataclass(frozen=True)
class BasicGuide:
    """Guider_Basic: the conditioning alone, as a cfg-1 CFGGuider without a negative."""

    conditioning: Any

    def denoiser(
        self,
        unet: Any,
        sampling: ModelSampling,
        device: torch.device,
        keep_uncond: bool,
        concat_for: ConcatFor | None,
    ) -> CFGDenoiser:
        schedule = sampling.schedule
        entries = entries_for(self.conditioning, device, schedule, "conditioning", unet)
        return CFGDenoiser(
            unet, schedule, entries, [], 1.0, keep_uncond=False, concat_for=concat_for, sampling=sampling
        )


class _DualDenoiser(CFGDenoiser):
    """Guider_DualCFG.predict_noise, with the model's CFG patches in its `cfg_function` call."""

    def __init__(self, middle: Any, cfg2: float, nested: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.middle, self.cfg2, self.nested = middle, cfg2, nested

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        positive, negative = self.sides_for(x.shape[2], x.shape[3], x.device, x.shape[0])
        # cond2 is resolved as a negative side (ComfyUI sets its prompt_type "negative")
        middle = self.extra_side(self.middle, x, "cond2")
        cfg1, cfg2 = self.cfg, self.cfg2
        if self.nested:
            neg, mid, pos = self.predict(x, sigma, [negative, middle, positive])
            text = self.cfg_function(x, sigma, (pos, positive), (mid, middle), cfg1)
            return neg + cfg2 * (text - neg)
        if math.isclose(cfg2, 1.0) and not cfg_patches.needs_uncond(self.unet):
            negative = []  # ComfyUI's cfg-1 optimisation: skip passes that cancel out
            if math.isclose(cfg1, 1.0):
                middle = []
        neg, mid, pos = self.predict(x, sigma, [negative, middle, positive])
        return self.cfg_function(x, sigma, (mid, middle), (neg, negative), cfg2) + (pos - mid) * cfg1

    def cfg_function(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: tuple[torch.Tensor, list[CondEntry]],
        uncond: tuple[torch.Tensor, list[CondEntry]],
        scale: float,
    ) -> torch.Tensor:
        """comfy.samplers.cfg_function on two sides' predictions: plain CFG, or the model's patches
        (RescaleCFG/PerpNeg mix, then PAG/SAG) with those sides as their cond and uncond. A skipped
        side predicts zeros, as calc_cond_batch gives for a None conditioning."""
        (cond_pred, cond_side), (uncond_pred, uncond_side) = cond, uncond
        if not unet_patches.active(self.unet):
            return uncond_pred + (cond_pred - uncond_pred) * scale
        passes = self.passes(x, sigma, cond_side, uncond_side)
        skipped = not uncond_side
        return cfg_patches.guided(
            self.unet, x, sigma, cond_pred, None if skipped else uncond_pred, scale, passes
        )


@dataclass(frozen=True)
class DualCFGGuide:
    """Guider_DualCFG: two positive prompts and a negative, with two scales."""

    cond1: Any
    cond2: Any
    negative: Any
    cfg_conds: float
    cfg_cond2_negative: float
    nested: bool

    def denoiser(
        self,
        unet: Any,
        sampling: ModelSampling,
        device: torch.device,
        keep_uncond: bool,
        concat_for: ConcatFor | None,
    ) -> CFGDenoiser:
        schedule = sampling.schedule
        return _DualDenoiser(
            self.cond2,
            self.cfg_cond2_negative,
            self.nested,
            unet=unet,
            schedule=schedule,
            positive=entries_for(self.cond1, device, schedule, "cond1", unet),
            negative=entries_for(self.negative, device, schedule, "negative", unet),
            cfg=self.cfg_conds,
            concat_for=concat_for,
            sampling=sampling,
        )


class _PerpNegDenoiser(CFGDenoiser):
    """Guider_PerpNeg.predict_noise: positive, negative and empty prompt in one batch, perp_neg, then
    the model's post-CFG patches (its CFG-mix patches are not used, as in ComfyUI)."""

    def __init__(self, empty: Any, neg_scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.empty, self.neg_scale = empty, neg_scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        positive, negative = self.sides_for(x.shape[2], x.shape[3], x.device, x.shape[0])
        empty = self.extra_side(self.empty, x)
        if not cfg_patches.needs_uncond(self.unet) and math.isclose(self.neg_scale, 0.0):
            negative = []  # ComfyUI's cfg-1 optimisation: passes whose weight is zero are skipped
            if math.isclose(self.cfg, 1.0):
                empty = []
        pos, neg, nocond = self.predict(x, sigma, [positive, negative, empty])
        self.uncond_denoised = neg
        result = cfg_patches.perp_neg(pos, neg, nocond, self.neg_scale, self.cfg)
        passes = self.passes(x, sigma, positive, negative)
        return cfg_patches.post_cfg(self.unet, x, result, pos, neg if negative else None, passes)


@dataclass(frozen=True)
class PerpNegGuide:
    """Guider_PerpNeg: CFG whose negative acts only perpendicular to the positive (Perp-Neg)."""

    positive: Any
    negative: Any
    empty: Any
    cfg: float
    neg_scale: float

    def denoiser(
        self,
        unet: Any,
        sampling: ModelSampling,
        device: torch.device,
        keep_uncond: bool,
        concat_for: ConcatFor | None,
    ) -> CFGDenoiser:
        schedule = sampling.schedule
        return _PerpNegDenoiser(
            self.empty,
            self.neg_scale,
            unet=unet,
            schedule=schedule,
            positive=entries_for(self.positive, device, schedule, "positive", unet),
            negative=entries_for(self.negative, device, schedule, "negative", unet),
            cfg=self.cfg,
            keep_uncond=keep_uncond,
            concat_for=concat_for,
            sampling=sampling,
        )
