"""Conditioning entries as the sampler uses them: read from CONDITIONING, and resolved per latent.

Sources: comfy/samplers.py (`get_area_and_mult`'s inputs, `resolve_areas_and_cond_masks_multidim`,
`create_cond_with_same_area_if_none`). `cond_entries` reads a CONDITIONING list into `CondEntry`s
(embedding, strength, step range, area, mask, inpaint concat), naming the side in every error;
`prepare_sides` resolves "percentage" areas and masks for a latent size, gives "mask bounds" masks
their bounding box, and pairs every area entry with a twin on the other side, as ComfyUI does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from nodes.sd.control import Control
from nodes.sd.gligen import Grounding, read_grounding
from nodes.sd.schedules import DiscreteSchedule

Area = tuple[int, int, int, int]  # ComfyUI's order, in latent pixels: (height, width, y, x)
SIDES = ("positive", "negative")  # CFGDenoiser's order of sides, for messages
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
    # SDXL's added conditioning (pooled output, size values; nodes/sd/adm.py), resolved per latent size
    added: tuple[torch.Tensor, torch.Tensor] | None = None
    options: dict[str, Any] | None = None  # the entry's options, kept for the added conditioning
    control: Control | None = None  # ControlNet(s) steering this entry's UNet calls
    control_to_uncond: bool = False  # ControlNetApply's: the negative side gets this control too
    gligen: Grounding | None = None  # GLIGENTextBoxApply's boxes (nodes/sd/gligen.py)


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


def percent_to_sigma(schedule: DiscreteSchedule, percent: float) -> float:
    """comfy ModelSamplingDiscrete.percent_to_sigma (ModelSamplingContinuousEDM's on a continuous table)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    return schedule.from_percent(percent)


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


def conditioning_on(conditioning: Any, device: torch.device) -> Any:
    """CONDITIONING with its embeddings on `device` (options, masks included, are moved later)."""
    if device.type == "cpu" or not isinstance(conditioning, (list, tuple)):
        return conditioning
    return [
        [item[0].to(device), *item[1:]]
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor)
        else item
        for item in conditioning
    ]


def entries_for(
    conditioning: Any, device: torch.device, schedule: DiscreteSchedule, what: str, unet: Any
) -> list[CondEntry]:
    """`cond_entries` of a CONDITIONING on `device`, checked against `unet`'s context width."""
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    return cond_entries(conditioning_on(conditioning, device), schedule, what, width)


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
        if width is not None and tensor.shape[-1] != width:
            raise ConditioningError(
                f"{what}: embedding width {tensor.shape[-1]} does not fit this model (it expects {width}); "
                "encode the prompt with the CLIP from the same checkpoint"
            )
        entries.append(
            CondEntry(
                cross_attn=tensor,
                strength=_number(opts, "strength", 1.0, what),
                sigma_start=percent_to_sigma(schedule, _number(opts, "start_percent", 0.0, what)),
                sigma_end=percent_to_sigma(schedule, _number(opts, "end_percent", 1.0, what)),
                area=_read_area(opts.get("area"), what),
                mask=_read_mask(opts.get("mask"), what),
                mask_strength=_number(opts, "mask_strength", 1.0, what),
                set_area_to_bounds=bool(opts.get("set_area_to_bounds", False)),
                concat_latent_image=_read_tensor(
                    opts.get("concat_latent_image"), "concat_latent_image", (4,), what
                ),
                concat_mask=_read_tensor(opts.get("concat_mask"), "concat_mask", (2, 3, 4), what),
                options=opts,
                control=_read_control(opts.get("control"), width, what),
                control_to_uncond=bool(opts.get("control_apply_to_uncond", False)),
                gligen=_read_gligen(opts.get("gligen"), what),
            )
        )
    return entries


def _read_gligen(value: Any, what: str) -> Grounding | None:
    try:
        return read_grounding(value, what)
    except ValueError as exc:
        raise ConditioningError(str(exc)) from None


def _read_control(value: Any, width: int | None, what: str) -> Control | None:
    """The `control` option: a ControlNet chain whose every net (or adapter) fits the model's family."""
    if value is None:
        return None
    if not isinstance(value, Control):
        raise ConditioningError(
            f"{what}: conditioning option 'control' must be a ControlNet, got {type(value).__name__}; "
            "set it with ControlNetApply"
        )
    # ComfyUI fails here with a matrix-shape error inside a ControlNet; a T2I-Adapter of another family
    # it runs, adding the features whose shapes happen to fit: refused here as well, naming the file
    for node in value.chain():
        if width is not None and node.model.context_dim != width:
            family = "SDXL" if node.model.family == "sdxl" else "SD1.x"
            kind = node.model.kind
            raise ConditioningError(
                f"{what}: {kind} '{node.model.name}' is an {family} {kind} (text width "
                f"{node.model.context_dim}) and does not fit this model (width {width}); pick one made for it"
            )
    return value


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
    return bool(
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
    side.append(replace(entry, cross_attn=smallest.cross_attn, concat=smallest.concat, added=smallest.added))


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
    controls = [e.control for e in pos if e.area is None and e.control is not None and e.control_to_uncond]
    boxes = [e.gligen for e in pos if e.area is None and e.gligen is not None]
    return pos, _to_uncond(_to_uncond(neg, "control", controls), "gligen", boxes)


def _to_uncond(neg: list[CondEntry], name: str, values: Sequence[Any]) -> list[CondEntry]:
    """apply_empty_x_to_equal_area for option `name` ("control": the positive ControlNetApply
    controls, control_apply_to_uncond; "gligen": every positive entry's boxes), from positive entries
    without area: when no negative entry without area has one, they go to the negative entries
    without area, cycling over them; a later value replaces an earlier one."""
    if not values or any(e.area is None and getattr(e, name) is not None for e in neg):
        return neg
    free = [i for i, e in enumerate(neg) if e.area is None]
    if not free:
        return neg
    out = list(neg)
    for n, value in enumerate(values):
        i = free[n % len(free)]
        out[i] = replace(out[i], **{name: value})
    return out
