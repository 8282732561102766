"""Classifier-free guidance around a diffusers UNet, as ComfyUI computes it.

Sources: comfy/samplers.py (`sampling_function`, `calc_cond_batch`, `cfg_function`),
comfy/conds.py (`CONDCrossAttn.concat`), comfy/model_base.py (`BaseModel._apply_model`) and
comfy/model_sampling.py (EPS). One call of `CFGDenoiser` is one step's denoised prediction:

1. Every conditioning entry is its own prediction (ConditioningCombine gives two entries);
   entries outside their start/end percent are skipped.
2. Entries are batched uncond-first in one UNet call; different token lengths are repeated to
   their least common multiple, which leaves attention unchanged.
3. Per side, predictions are averaged weighted by strength (counts start at 1e-37).
4. CFG mixes the x0 predictions: uncond + (cond - uncond) * cfg; at cfg 1 no uncond pass runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nodes.sd.schedules import DiscreteSchedule


class ConditioningError(ValueError):
    """A CONDITIONING value the sampler cannot use."""


@dataclass(frozen=True)
class CondEntry:
    """One conditioning entry: token embeddings [1, T, C], its weight and its active sigma range."""

    cross_attn: torch.Tensor
    strength: float = 1.0
    sigma_start: float = math.inf  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0


def _percent_to_sigma(schedule: DiscreteSchedule, percent: float) -> float:
    """comfy ModelSamplingDiscrete.percent_to_sigma."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(schedule.sigma(torch.tensor((1.0 - percent) * 999.0)))


def cond_entries(
    conditioning: Any, schedule: DiscreteSchedule, what: str, width: int | None = None
) -> list[CondEntry]:
    """Read a CONDITIONING value (ComfyUI's list of [tensor, options]) into entries.

    Args:
        conditioning: the value on the link.
        schedule: the model's noise levels (for start/end percent).
        what: "positive" or "negative", for messages.
        width: the UNet's cross-attention width, to reject another model family's embeddings.
    """
    if not isinstance(conditioning, (list, tuple)):
        raise ConditioningError(
            f"{what}: expected CONDITIONING (a list of [embedding, options]), got "
            f"{type(conditioning).__name__}; connect a CLIPTextEncode output"
        )
    entries = []
    for item in conditioning:
        if not isinstance(item, (list, tuple)) or len(item) < 1 or not isinstance(item[0], torch.Tensor):
            raise ConditioningError(f"{what}: a conditioning entry is not [embedding tensor, options]")
        tensor = item[0]
        opts = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
        if tensor.dim() != 3:
            raise ConditioningError(
                f"{what}: embedding must be [batch, tokens, channels], got {list(tensor.shape)}"
            )
        unsupported = sorted(k for k in ("area", "mask", "control", "gligen") if opts.get(k) is not None)
        if unsupported:
            raise ConditioningError(
                f"{what}: conditioning with {', '.join(unsupported)} is not supported yet"
            )
        if width is not None and tensor.shape[-1] != width:
            raise ConditioningError(
                f"{what}: embedding width {tensor.shape[-1]} does not fit this model (it expects {width}); "
                "encode the prompt with the CLIP from the same checkpoint"
            )
        entries.append(
            CondEntry(
                cross_attn=tensor,
                strength=float(opts.get("strength", 1.0)),
                sigma_start=_percent_to_sigma(schedule, float(opts.get("start_percent", 0.0))),
                sigma_end=_percent_to_sigma(schedule, float(opts.get("end_percent", 1.0))),
            )
        )
    return entries


def _can_concat(a: torch.Tensor, b: torch.Tensor) -> bool:
    """CONDCrossAttn.can_concat: same width; token lengths whose LCM is at most 4x the shorter."""
    if a.shape == b.shape:
        return True
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    la, lb = a.shape[1], b.shape[1]
    return math.lcm(la, lb) // min(la, lb) <= 4


def _concat_cross_attn(conds: Sequence[torch.Tensor]) -> torch.Tensor:
    """CONDCrossAttn.concat: repeat each to the LCM of the token lengths, then stack the batch."""
    length = conds[0].shape[1]
    for c in conds[1:]:
        length = math.lcm(length, c.shape[1])
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in conds])


def _repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """comfy.utils.repeat_to_batch_size."""
    if t.shape[0] > batch:
        return t[:batch]
    if t.shape[0] < batch:
        return t.repeat([math.ceil(batch / t.shape[0])] + [1] * (t.dim() - 1))[:batch]
    return t


class CFGDenoiser:
    """`denoiser(x, sigma_batch) -> x0`: the guided denoised prediction of an EPS UNet."""

    def __init__(
        self,
        unet: Any,
        schedule: DiscreteSchedule,
        positive: list[CondEntry],
        negative: list[CondEntry],
        cfg: float,
        keep_uncond: bool = False,
    ) -> None:
        self.unet = unet
        self.keep_uncond = keep_uncond  # CFG++ samplers need the uncond pass even at cfg 1
        self.schedule = schedule
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.uncond_denoised: torch.Tensor | None = None  # kept for CFG++ samplers

    def apply_model(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """BaseModel._apply_model for EPS: scale the input, integer timestep, x - sigma * eps."""
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))
        xc = x / (s**2 + 1.0) ** 0.5
        t = self.schedule.timestep(sigma).float()
        dtype = next(self.unet.parameters()).dtype
        eps = self.unet(xc.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[
            0
        ].float()
        return x - eps * s

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        skip_uncond = math.isclose(self.cfg, 1.0) and not self.keep_uncond
        cond, uncond = self.predict(x, sigma, [self.positive, [] if skip_uncond else self.negative])
        self.uncond_denoised = uncond
        if skip_uncond:
            return cond
        return uncond + (cond - uncond) * self.cfg

    def predict(
        self, x: torch.Tensor, sigma: torch.Tensor, sides: list[list[CondEntry]]
    ) -> list[torch.Tensor]:
        """calc_cond_batch: the strength-weighted mean prediction of each side's active entries."""
        level = float(sigma.max())
        to_run = [
            (entry, side)
            for side, entries in enumerate(sides)
            for entry in entries
            if entry.sigma_end <= level <= entry.sigma_start
        ]
        outs = [torch.zeros_like(x) for _ in sides]
        counts = [torch.ones_like(x) * 1e-37 for _ in sides]
        while to_run:
            first = to_run[0][0].cross_attn
            # ComfyUI pops matching chunks from the back, so the batch runs in reverse order
            picked = [i for i in range(len(to_run)) if _can_concat(to_run[i][0].cross_attn, first)][::-1]
            chunk = [to_run.pop(i) for i in picked]
            batch = x.shape[0]
            context = _concat_cross_attn([_repeat_to_batch(e.cross_attn, batch) for e, _ in chunk])
            result = self.apply_model(torch.cat([x] * len(chunk)), torch.cat([sigma] * len(chunk)), context)
            for (entry, side), pred in zip(chunk, result.chunk(len(chunk)), strict=True):
                outs[side] += pred * entry.strength
                counts[side] += entry.strength
        return [out / count for out, count in zip(outs, counts, strict=True)]
