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

An inpainting UNet (9 input channels) also gets each entry's `c_concat` (mask + masked-image
latent, built by the caller's `concat_for`, see nodes/sd/ksampler.py) appended to its input
channels: cropped to the entry's area, repeated to the batch, batched like the embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from nodes.sd.schedules import DiscreteSchedule

Area = tuple[int, int, int, int]  # ComfyUI's order, in latent pixels: (height, width, y, x)
_SIDES = ("positive", "negative")  # CFGDenoiser's order of sides, for messages
AREA_FEATHER = 8  # get_area_and_mult's `fuzz`: the ramp at an area's inner edges, in latent pixels


class ConditioningError(ValueError):
    """A CONDITIONING value the sampler cannot use."""


@dataclass(frozen=True)
class CondEntry:
    """One conditioning entry: token embeddings [1, T, C], its weight and its active sigma range.

    `area` is (h, w, y, x) in latent pixels or ("percentage", h, w, y, x) as fractions; `mask` is
    [B, H, W] at any size until the sampler resolves it against the latent (see `resolve_entry`).
    `concat_latent_image` / `concat_mask` are InpaintModelConditioning's options (an inpainting
    model's input); `concat` is the c_concat built from them for one latent shape.
    """

    cross_attn: torch.Tensor
    strength: float = 1.0
    sigma_start: float = math.inf  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    area: tuple[Any, ...] | None = None
    mask: torch.Tensor | None = None
    mask_strength: float = 1.0
    set_area_to_bounds: bool = False
    concat_latent_image: torch.Tensor | None = None
    concat_mask: torch.Tensor | None = None
    concat: torch.Tensor | None = None


def _number(opts: dict[str, Any], key: str, default: float, what: str) -> float:
    """A numeric conditioning option, or an error naming it and the side."""
    value = opts.get(key, default)
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ConditioningError(
            f"{what}: conditioning option {key!r} must be a number, got {value!r}"
        ) from None


def _percent_to_sigma(schedule: DiscreteSchedule, percent: float) -> float:
    """comfy ModelSamplingDiscrete.percent_to_sigma."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return float(schedule.sigma(torch.tensor((1.0 - percent) * 999.0)))


def _read_area(value: Any, what: str) -> tuple[Any, ...] | None:
    """Check an "area" option: (h, w, y, x) integers or ("percentage", h, w, y, x) fractions."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 5 and value[0] == "percentage":
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[1:]):
            return ("percentage", *(float(v) for v in value[1:]))
    elif isinstance(value, (list, tuple)) and len(value) == 4:
        ints = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        if ints and value[0] > 0 and value[1] > 0:
            return tuple(value)
    raise ConditioningError(
        f"{what}: conditioning area must be (height, width, y, x) in latent pixels or "
        f'("percentage", height, width, y, x), got {value!r}; set it with ConditioningSetArea'
    )


def _read_mask(value: Any, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3) or value.numel() == 0:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConditioningError(
            f"{what}: conditioning mask must be a MASK [batch, height, width], got {shape}; "
            "set it with ConditioningSetMask"
        )
    return value


def _read_tensor(value: Any, name: str, dims: tuple[int, ...], what: str) -> torch.Tensor | None:
    """An optional tensor option (concat_latent_image, concat_mask) of one of the given ranks."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() not in dims or value.numel() == 0:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConditioningError(
            f"{what}: conditioning option {name!r} must be a tensor of rank {' or '.join(map(str, dims))}, "
            f"got {shape}; set it with InpaintModelConditioning"
        )
    return value


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
        unsupported = sorted(k for k in ("control", "gligen") if opts.get(k) is not None)
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
                strength=_number(opts, "strength", 1.0, what),
                sigma_start=_percent_to_sigma(schedule, _number(opts, "start_percent", 0.0, what)),
                sigma_end=_percent_to_sigma(schedule, _number(opts, "end_percent", 1.0, what)),
                area=_read_area(opts.get("area"), what),
                mask=_read_mask(opts.get("mask"), what),
                mask_strength=_number(opts, "mask_strength", 1.0, what),
                set_area_to_bounds=bool(opts.get("set_area_to_bounds", False)),
                concat_latent_image=_read_tensor(
                    opts.get("concat_latent_image"), "concat_latent_image", (4,), what
                ),
                concat_mask=_read_tensor(opts.get("concat_mask"), "concat_mask", (2, 3, 4), what),
            )
        )
    return entries


def _mask_bounds(mask: torch.Tensor) -> Area:
    """The "mask bounds" area: the bounding box of any nonzero mask pixel, at least 8x8."""
    bounds = torch.amax(torch.abs(mask), dim=0)
    ys, xs = torch.where(bounds != 0)
    if ys.numel() == 0:
        return (8, 8, 0, 0)  # an all-zero mask: the smallest area, whose weight is zero anyway
    y, x = int(ys.min()), int(xs.min())
    return (max(8, int(ys.max()) - y + 1), max(8, int(xs.max()) - x + 1), y, x)


def resolve_entry(entry: CondEntry, height: int, width: int, device: torch.device | None = None) -> CondEntry:
    """resolve_areas_and_cond_masks_multidim for one entry and a latent of height x width."""
    area = entry.area
    if area is not None and area[0] == "percentage":
        _, h, w, y, x = area
        area = (max(1, round(h * height)), max(1, round(w * width)), round(y * height), round(x * width))
    mask = entry.mask
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
        if device is not None and mask.device != device:
            mask = mask.to(device)
        if tuple(mask.shape[1:]) != (height, width):
            # comfy.utils.common_upscale(..., "bilinear", "none"): plain interpolate, no antialias
            mask = torch.nn.functional.interpolate(
                mask.unsqueeze(1).float(), size=(height, width), mode="bilinear"
            ).squeeze(1)
        if entry.set_area_to_bounds:
            area = _mask_bounds(mask)
    if area is entry.area and mask is entry.mask and not entry.set_area_to_bounds:  # nothing to do
        return entry
    return replace(entry, area=area, mask=mask, set_area_to_bounds=False)


def _area_inside(inner: tuple[Any, ...], outer: tuple[Any, ...]) -> bool:
    return (
        inner[2] >= outer[2]
        and inner[3] >= outer[3]
        and inner[0] + inner[2] <= outer[0] + outer[2]
        and inner[1] + inner[3] <= outer[1] + outer[3]
    )


def _add_twin(side: list[CondEntry], entry: CondEntry) -> None:
    """create_cond_with_same_area_if_none: give `side` an entry with `entry`'s area (and mask,
    strength, range) but the embedding of that side's smallest entry covering it."""
    if entry.area is None:
        return
    smallest: CondEntry | None = None
    for other in side:
        if other.area is None:
            smallest = other if smallest is None else smallest
        elif _area_inside(entry.area, other.area):
            if smallest is None or smallest.area is None:
                smallest = other
            elif smallest.area[0] * smallest.area[1] > other.area[0] * other.area[1]:
                smallest = other
    if smallest is None or (smallest.area is not None and tuple(smallest.area) == tuple(entry.area)):
        return
    # ComfyUI copies the covering entry's model conds: its embedding and its c_concat
    side.append(replace(entry, cross_attn=smallest.cross_attn, concat=smallest.concat))


def prepare_sides(
    positive: Sequence[CondEntry],
    negative: Sequence[CondEntry],
    height: int,
    width: int,
    device: torch.device | None = None,
) -> tuple[list[CondEntry], list[CondEntry]]:
    """process_conds: resolve areas and masks for the latent size, then pair areas across sides."""
    pos = [resolve_entry(e, height, width, device) for e in positive]
    neg = [resolve_entry(e, height, width, device) for e in negative]
    for entry in list(pos):
        _add_twin(neg, entry)
    for entry in list(neg):
        _add_twin(pos, entry)
    return pos, neg


@dataclass(frozen=True)
class _Job:
    """get_area_and_mult's result: what one entry contributes where."""

    input_x: torch.Tensor
    mult: torch.Tensor | float
    area: Area | None
    cross_attn: torch.Tensor
    side: int
    concat: torch.Tensor | None = None  # c_concat for input_x (an inpainting UNet's extra channels)


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
                f"{_SIDES[side] if side < 2 else 'conditioning'}: "
                f"conditioning area at x={left * 8}, y={y * 8} (pixels) lies outside the "
                f"{full[1] * 8}x{full[0] * 8} image; move it inside (ConditioningSetArea x/y)"
            )
        area = (min(full[0] - y, h), min(full[1] - left, w), y, left)
        input_x = x[:, :, y : y + area[0], left : left + area[1]]
    concat = entry.concat
    if concat is not None:  # CONDNoiseShape.process_cond: crop to the area, repeat to the batch
        if area is not None:
            concat = concat[:, :, area[2] : area[2] + area[0], area[3] : area[3] + area[1]]
        concat = _repeat_to_batch(concat, input_x.shape[0])
    if entry.mask is None and area is None:
        return _Job(input_x, entry.strength, None, entry.cross_attn, side, concat)  # a plain entry
    if entry.mask is not None:
        mask = entry.mask[: input_x.shape[0]]
        if input_x.shape[0] % mask.shape[0]:
            raise ConditioningError(
                f"{_SIDES[side] if side < 2 else 'conditioning'}: "
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
    return _Job(input_x, mult, area, entry.cross_attn, side, concat)


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
    ) -> None:
        self.unet = unet
        self.concat_for = concat_for
        self.keep_uncond = keep_uncond  # CFG++ samplers need the uncond pass even at cfg 1
        self.schedule = schedule
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.uncond_denoised: torch.Tensor | None = None  # kept for CFG++ samplers
        self._sides: dict[tuple[Any, ...], tuple[list[CondEntry], list[CondEntry]]] = {}

    def apply_model(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """BaseModel._apply_model for EPS: scale the input, append c_concat, integer timestep,
        x - sigma * eps."""
        s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))
        xc = x / (s**2 + 1.0) ** 0.5
        if concat is not None:
            xc = torch.cat([xc, concat.to(xc.dtype)], dim=1)
        t = self.schedule.timestep(sigma).float()
        dtype = next(self.unet.parameters()).dtype
        eps = self.unet(xc.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[
            0
        ].float()
        return x - eps * s

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
            self._sides[key] = prepare_sides(positive, negative, height, width, device)
        return self._sides[key]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        skip_uncond = math.isclose(self.cfg, 1.0) and not self.keep_uncond
        positive, negative = self.sides_for(x.shape[2], x.shape[3], x.device, x.shape[0])
        cond, uncond = self.predict(x, sigma, [positive, [] if skip_uncond else negative])
        self.uncond_denoised = uncond
        if skip_uncond:
            return cond
        return uncond + (cond - uncond) * self.cfg

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
            # ComfyUI pops matching chunks from the back, so the batch runs in reverse order
            picked = [
                i
                for i, job in enumerate(to_run)
                if job.input_x.shape == first.input_x.shape
                and _can_concat(job.cross_attn, first.cross_attn)
                and (job.concat is None) == (first.concat is None)
            ][::-1]
            chunk = [to_run.pop(i) for i in picked]
            batch = x.shape[0]
            context = _concat_cross_attn([_repeat_to_batch(job.cross_attn, batch) for job in chunk])
            inputs = torch.cat([job.input_x for job in chunk])
            concats = [job.concat for job in chunk if job.concat is not None]
            concat = torch.cat(concats) if concats else None
            result = self.apply_model(inputs, torch.cat([sigma] * len(chunk)), context, concat)
            for job, pred in zip(chunk, result.chunk(len(chunk)), strict=True):
                out, count = outs[job.side], counts[job.side]
                if job.area is not None:
                    h, w, y, left = job.area
                    out = out[:, :, y : y + h, left : left + w]
                    count = count[:, :, y : y + h, left : left + w]
                out += pred * job.mult
                count += job.mult
        return [out / count for out, count in zip(outs, counts, strict=True)]
