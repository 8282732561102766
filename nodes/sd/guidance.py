"""Classifier-free guidance around a diffusers UNet, as ComfyUI computes it.

Sources: comfy/samplers.py (`sampling_function`, `calc_cond_batch`, `get_area_and_mult`,
`resolve_areas_and_cond_masks_multidim`, `create_cond_with_same_area_if_none`, `cfg_function`),
comfy/conds.py (`CONDCrossAttn.concat`), comfy/model_base.py (`BaseModel._apply_model`) and
comfy/model_sampling.py (EPS). One call of `CFGDenoiser` is one step's denoised prediction:

1. When sampling starts (per latent size): "percentage" areas become latent pixels, masks are
   resized to the latent (bilinear), "mask bounds" masks get their bounding box as area, and every
   area entry of one side gets a twin on the other side (same area, that side's embedding).
2. Every conditioning entry is its own prediction (ConditioningCombine gives two entries);
   entries outside their start/end percent are skipped. An area entry predicts on its crop.
3. Entries whose crops have the same shape are batched uncond-first in one UNet call; different
   token lengths are repeated to their least common multiple, which leaves attention unchanged.
4. Per side, out = sum(pred * mult) / sum(mult) with counts starting at 1e-37; mult is the
   strength, times the mask, or for an area without mask a linear ramp at its inner edges.
5. CFG mixes the x0 predictions: uncond + (cond - uncond) * cfg; at cfg 1 no uncond pass runs.

An entry with GLIGEN boxes (nodes/sd/gligen.py) gets its grounding tokens for its input at every
call and runs in a UNet call of its own, with the gated layers attached for that call.

An inpainting UNet (9 input channels) also gets each entry's `c_concat` (mask + masked-image
latent, built by the caller's `concat_for`, see nodes/sd/ksampler.py) appended to its input
channels: cropped to the entry's area, repeated to the batch, batched like the embeddings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch

from nodes.sd import cfg_patches, gligen, unet_patches
from nodes.sd import control as controlnet
from nodes.sd.adm import adm_inputs, adm_width
from nodes.sd.cond_entries import (  # re-exported: the sampler's public names stay here
    AREA_FEATHER,
    SIDES,
    Area,
    CondEntry,
    ConditioningError,
    cond_entries,
    entries_for,
    percent_to_sigma,
    prepare_sides,
    resolve_entry,
)
from nodes.sd.control import Control
from nodes.sd.control_lora import build_control_lora
from nodes.sd.controlnet import ControlModel
from nodes.sd.latent_ops import repeat_to_batch_size
from nodes.sd.model_sampling import EPS, ModelSampling
from nodes.sd.schedules import DiscreteSchedule
from nodes.sd.t2i_adapter import Features, features_added

log = logging.getLogger(__name__)

__all__ = [
    "AREA_FEATHER",
    "CFGDenoiser",
    "CondEntry",
    "ConditioningError",
    "cond_entries",
    "prepare_sides",
    "resolve_entry",
]


@dataclass(frozen=True)
class GligenCall:
    """A job's GLIGEN call: the model and the grounding tokens for its input (nodes/sd/gligen.py)."""

    model: gligen.GligenModel
    tokens: torch.Tensor


@dataclass(frozen=True)
class _Job:
    """get_area_and_mult's result: what one entry contributes where."""

    input_x: torch.Tensor
    mult: torch.Tensor | float
    area: Area | None
    cross_attn: torch.Tensor
    side: int
    concat: torch.Tensor | None = None  # c_concat for input_x (an inpainting UNet's extra channels)
    added: tuple[torch.Tensor, torch.Tensor] | None = None  # SDXL (pooled, size values)
    control: Control | None = None  # entries batch together only with the very same control
    grounding: GligenCall | None = None  # GLIGEN boxes and their tokens: such a job runs alone


def _feather(mult: torch.Tensor, area: Area, full: Sequence[int]) -> None:
    """Linear ramp over up to 8 latent pixels at each edge of the area that is inside the latent."""
    for dim in range(2):
        size, offset = area[dim], area[2 + dim]
        ramp = min(AREA_FEATHER, mult.shape[2 + dim] // 4)
        for t in range(ramp):
            if offset != 0:
                mult.narrow(2 + dim, t, 1).mul_((1.0 / ramp) * (t + 1))
            if size + offset < full[dim]:
                mult.narrow(2 + dim, size - 1 - t, 1).mul_((1.0 / ramp) * (t + 1))


def _job(entry: CondEntry, x: torch.Tensor, side: int) -> _Job:
    """get_area_and_mult: the crop of x this entry predicts on and its weight there."""
    full = x.shape[2:]
    entry = resolve_entry(entry, full[0], full[1], x.device)
    area: Area | None = None
    input_x = x
    if entry.area is not None:
        h, w, y, left = (int(v) for v in entry.area)
        if y >= full[0] or left >= full[1]:
            raise ConditioningError(
                f"{SIDES[side] if side < 2 else 'conditioning'}: "
                f"conditioning area at x={left * 8}, y={y * 8} (pixels) lies outside the "
                f"{full[1] * 8}x{full[0] * 8} image; move it inside (ConditioningSetArea x/y)"
            )
        area = (min(full[0] - y, h), min(full[1] - left, w), y, left)
        input_x = x[:, :, y : y + area[0], left : left + area[1]]
    concat = entry.concat
    if concat is not None:  # CONDNoiseShape.process_cond: crop to the area, repeat to the batch
        if area is not None:
            concat = concat[:, :, area[2] : area[2] + area[0], area[3] : area[3] + area[1]]
        concat = repeat_to_batch_size(concat, input_x.shape[0])
    grounding = None
    if entry.gligen is not None:  # get_area_and_mult: the boxes placed on this job's input
        tokens = gligen.grounding_tokens(entry.gligen, input_x.shape, input_x.device)
        grounding = GligenCall(entry.gligen.model, tokens)
    if entry.mask is None and area is None:
        strength, cross_attn = entry.strength, entry.cross_attn
        return _Job(input_x, strength, None, cross_attn, side, concat, entry.added, entry.control, grounding)
    if entry.mask is not None:
        mask = entry.mask[: input_x.shape[0]]
        if input_x.shape[0] % mask.shape[0]:
            raise ConditioningError(
                f"{SIDES[side] if side < 2 else 'conditioning'}: "
                f"a conditioning mask batch of {mask.shape[0]} does not divide the latent batch of "
                f"{input_x.shape[0]}; give ConditioningSetMask one mask or one per latent"
            )
        if area is not None:
            mask = mask[:, area[2] : area[2] + area[0], area[3] : area[3] + area[1]]
        mask = (mask * entry.mask_strength).unsqueeze(1)
        mask = mask.repeat(input_x.shape[0] // mask.shape[0], input_x.shape[1], 1, 1)
    else:
        mask = torch.ones_like(input_x)
    mult = mask.to(input_x.dtype) * entry.strength
    if entry.mask is None and area is not None:
        _feather(mult, area, full)
    return _Job(input_x, mult, area, entry.cross_attn, side, concat, entry.added, entry.control, grounding)


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


def _with_added(entry: CondEntry, width: int, height: int, side: str, adm: int) -> CondEntry:
    added = adm_inputs(entry.options or {}, width, height, side, adm, side)
    return replace(entry, added=added)


def _batched_added(chunk: Sequence[_Job], batch: int) -> dict[str, torch.Tensor] | None:
    """CONDRegular.concat of the jobs' (pooled, size values), each repeated to the latent batch."""
    parts = [job.added for job in chunk]
    if any(p is None for p in parts):
        return None
    return {
        "text_embeds": torch.cat([repeat_to_batch_size(p[0], batch) for p in parts if p is not None]),
        "time_ids": torch.cat([repeat_to_batch_size(p[1], batch) for p in parts if p is not None]),
    }


ConcatFor = Callable[[CondEntry, torch.Size, torch.device], torch.Tensor]
"""(entry, latent shape, device) -> the entry's c_concat [B, C, H, W] (model_base.concat_cond)."""


class CFGDenoiser:
    """`denoiser(x, sigma_batch) -> x0`: the guided denoised prediction of an EPS UNet.

    `concat_for`, given for an inpainting UNet, builds each entry's extra input channels once per
    latent shape (before areas are paired across sides, as ComfyUI's process_conds does).
    """

    def __init__(
        self,
        unet: Any,
        schedule: DiscreteSchedule,
        positive: list[CondEntry],
        negative: list[CondEntry],
        cfg: float,
        keep_uncond: bool = False,
        concat_for: ConcatFor | None = None,
        sampling: ModelSampling = EPS,
    ) -> None:
        self.unet = unet
        self.sampling = sampling
        self.concat_for = concat_for
        self.keep_uncond = keep_uncond  # CFG++ samplers need the uncond pass even at cfg 1
        self.schedule = schedule
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.uncond_denoised: torch.Tensor | None = None  # kept for CFG++ samplers
        self._sides: dict[tuple[Any, ...], tuple[list[CondEntry], list[CondEntry]]] = {}
        self._extra: dict[tuple[Any, ...], tuple[Any, list[CondEntry]]] = {}  # keeps the value alive
        self._control_nets: dict[int, Any] = {}  # control LoRA -> its network on this (patched) UNet
        self._adapter_features: dict[tuple[Any, ...], Features] = {}  # T2I-Adapter features by hint
        self._warned_left_out = False

    def apply_model(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        concat: torch.Tensor | None = None,
        added: dict[str, torch.Tensor] | None = None,
        control: Control | None = None,
        batched_number: int = 1,
        grounding: GligenCall | None = None,
    ) -> torch.Tensor:
        """BaseModel._apply_model: scale the input, append c_concat, the model sampling's timestep
        (the table index; `0.25·ln σ` on a continuous schedule), then its denoised formula. A control's
        residuals are computed from the same inputs (without c_concat) and added inside the UNet;
        GLIGEN's gated layers run inside its transformer blocks for this call only."""
        xc = self.sampling.scale_input(sigma, x)
        t = self.schedule.timestep(sigma).float()
        dtype = next(self.unet.parameters()).dtype
        kwargs = {k: v.to(xc.device, dtype) for k, v in added.items()} if added is not None else None
        extra: dict[str, Any] = {}
        inputs: list[torch.Tensor | None] = []  # T2I-Adapters' features, added after input blocks
        middle: torch.Tensor | None = None
        if control is not None:
            found = controlnet.residuals(
                control,
                xc.to(dtype),
                t,
                float(sigma[0]),
                context.to(dtype),
                kwargs,
                batched_number,
                lambda p: percent_to_sigma(self.schedule, p),
                self.control_net,
                self.adapter_features,
            )
            if found is not None:
                inputs, middle = found["input"], next(iter(found["middle"]), None)
            if found is not None and found["output"]:  # ControlNets': diffusers adds them (and middle)
                extra = {
                    "down_block_additional_residuals": found["output"],
                    "mid_block_additional_residual": middle,
                }
                middle = None
        if concat is not None:
            xc = torch.cat([xc, concat.to(xc.dtype)], dim=1)
        if grounding is not None:
            extra["cross_attention_kwargs"] = {"gligen": {"objs": grounding.tokens.to(xc.device, dtype)}}
        left_out: list[str] = []
        with ExitStack() as stack:
            if grounding is not None:
                stack.enter_context(gligen.gated_layers_attached(self.unet, grounding.model))
            if inputs or middle is not None:
                left_out = stack.enter_context(features_added(self.unet, inputs, middle))
            eps: torch.Tensor = self.unet(
                xc.to(dtype),
                t,
                encoder_hidden_states=context.to(dtype),
                added_cond_kwargs=kwargs,
                return_dict=False,
                **extra,
            )[0].float()
        if left_out and not self._warned_left_out and control is not None:
            self._warned_left_out = True  # ComfyUI warns at every call; once per sampling is enough
            names = ", ".join(sorted({f"'{n.model.name}'" for n in control.chain() if n.model.adapter}))
            log.warning(
                "T2I-Adapter %s: features left out because this model's UNet does not take them there "
                "(as ComfyUI leaves them out): %s",
                names,
                "; ".join(left_out),
            )
        return self.sampling.denoised(sigma, eps, x)

    def adapter_features(self, control: Control, x: torch.Tensor, batched_number: int) -> Features:
        """A T2I-Adapter's features for this hint size and batch, computed once per sampling (ComfyUI's
        T2IAdapter keeps its `control_input` until the latent size changes)."""
        key = (id(control), x.shape[0], x.shape[2], x.shape[3], x.device)
        found = self._adapter_features.get(key)
        if found is None:
            found = self._adapter_features[key] = controlnet.adapter_features(control, x, batched_number)
        return found

    def control_net(self, model: ControlModel) -> Any:
        """The network of a ControlNet on this UNet: its own, or a control LoRA's, built once per
        sampling from the UNet's weights as patched now (ComfyUI's ControlLora.pre_run)."""
        if model.lora is None:
            return model.net
        found = self._control_nets.get(id(model))
        if found is None:
            found = self._control_nets[id(model)] = build_control_lora(model, self.unet)
        return found

    def sides_for(
        self, height: int, width: int, device: torch.device | None = None, batch: int = 1
    ) -> tuple[list[CondEntry], list[CondEntry]]:
        """The positive and negative entries resolved for a latent of this size (computed once)."""
        key = (height, width, device, batch)
        if key not in self._sides:
            positive, negative = self.positive, self.negative
            if self.concat_for is not None:
                shape = torch.Size((batch, 4, height, width))
                where = device or torch.device("cpu")
                positive = [replace(e, concat=self.concat_for(e, shape, where)) for e in positive]
                negative = [replace(e, concat=self.concat_for(e, shape, where)) for e in negative]
            adm = adm_width(self.unet)
            if adm is not None:  # encode_model_conds: each side's entries get their added conditioning
                positive = [_with_added(e, width, height, "positive", adm) for e in positive]
                negative = [_with_added(e, width, height, "negative", adm) for e in negative]
            self._sides[key] = prepare_sides(positive, negative, height, width, device)
        return self._sides[key]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        skip_uncond = (
            math.isclose(self.cfg, 1.0) and not self.keep_uncond and not cfg_patches.needs_uncond(self.unet)
        )
        positive, negative = self.sides_for(x.shape[2], x.shape[3], x.device, x.shape[0])
        cond, uncond = self.predict(x, sigma, [positive, [] if skip_uncond else negative])
        self.uncond_denoised = uncond
        if unet_patches.active(self.unet):  # RescaleCFG, PerpNeg, PAG, SAG: the model's CFG patches
            passes = self.passes(x, sigma, positive, negative)
            return cfg_patches.guided(
                self.unet, x, sigma, cond, None if skip_uncond else uncond, self.cfg, passes
            )
        if skip_uncond:
            return cond
        return uncond + (cond - uncond) * self.cfg

    def passes(
        self, x: torch.Tensor, sigma: torch.Tensor, positive: list[CondEntry], negative: list[CondEntry]
    ) -> cfg_patches.Passes:
        """The extra UNet passes a CFG patch may ask for at this step."""
        return cfg_patches.Passes(
            cond=lambda: self.predict(x, sigma, [positive])[0],
            uncond_at=lambda degraded: self.predict(degraded, sigma, [negative])[0],
            extra=lambda conditioning: self.predict(x, sigma, [self.extra_side(conditioning, x)])[0],
        )

    def extra_side(
        self, conditioning: Any, x: torch.Tensor, what: str = "empty_conditioning"
    ) -> list[CondEntry]:
        """A CONDITIONING value's entries resolved as a negative side (PerpNeg's empty prompt,
        DualCFGGuider's cond2), once per latent shape; `what` names the input in errors."""
        key = (id(conditioning), x.shape[2], x.shape[3], x.device, x.shape[0])
        if key not in self._extra:
            entries = entries_for(conditioning, x.device, self.schedule, what, self.unet)
            if self.concat_for is not None:
                shape = torch.Size((x.shape[0], 4, x.shape[2], x.shape[3]))
                entries = [replace(e, concat=self.concat_for(e, shape, x.device)) for e in entries]
            adm = adm_width(self.unet)
            if adm is not None:
                entries = [_with_added(e, x.shape[3], x.shape[2], "negative", adm) for e in entries]
            self._extra[key] = (conditioning, prepare_sides(entries, [], x.shape[2], x.shape[3], x.device)[0])
        return self._extra[key][1]

    def predict(
        self, x: torch.Tensor, sigma: torch.Tensor, sides: list[list[CondEntry]]
    ) -> list[torch.Tensor]:
        """calc_cond_batch: per side, the mult-weighted mean prediction of its active entries."""
        level = float(sigma.max())
        to_run = [
            _job(entry, x, side)
            for side, entries in enumerate(sides)
            for entry in entries
            if entry.sigma_end <= level <= entry.sigma_start
        ]
        outs = [torch.zeros_like(x) for _ in sides]
        counts = [torch.ones_like(x) * 1e-37 for _ in sides]
        while to_run:
            first = to_run[0]
            # ComfyUI pops matching chunks from the back, so the batch runs in reverse order; a job
            # with GLIGEN boxes has patches of its own, which never batch
            picked = [
                i
                for i, job in enumerate(to_run)
                if job.input_x.shape == first.input_x.shape
                and _can_concat(job.cross_attn, first.cross_attn)
                and (job.concat is None) == (first.concat is None)
                and job.control is first.control
                and job.grounding is None
                and first.grounding is None
            ][::-1] or [0]
            chunk = [to_run.pop(i) for i in picked]
            batch = x.shape[0]
            context = _concat_cross_attn([repeat_to_batch_size(job.cross_attn, batch) for job in chunk])
            inputs = torch.cat([job.input_x for job in chunk])
            concats = [job.concat for job in chunk if job.concat is not None]
            concat = torch.cat(concats) if concats else None
            added = _batched_added(chunk, batch)
            sigmas = torch.cat([sigma] * len(chunk))
            cfg_patches.batch_sides(self.unet, [job.side for job in chunk])
            result = self.apply_model(
                inputs, sigmas, context, concat, added, first.control, len(chunk), first.grounding
            )
            for job, pred in zip(chunk, result.chunk(len(chunk)), strict=True):
                out, count = outs[job.side], counts[job.side]
                if job.area is not None:
                    h, w, y, left = job.area
                    out = out[:, :, y : y + h, left : left + w]
                    count = count[:, :, y : y + h, left : left + w]
                out += pred * job.mult
                count += job.mult
        return [out / count for out, count in zip(outs, counts, strict=True)]
