"""Mask nodes (ComfyUI comfy_extras/nodes_mask.py: ids, inputs and arithmetic, quirks included).

MASK values are float32 `[B, H, W]`; a node given `[H, W]` reads it as one mask, as ComfyUI does.
Nodes never modify the tensors they were given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from nodegraph.node import MAX_RESOLUTION, Boolean, Combo, Float, Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE, LATENT, MASK
from nodes.sd.latent_ops import repeat_to_batch_size
from nodes.sd.values import Latent

CHANNELS = ("red", "green", "blue", "alpha")


def batched(mask: torch.Tensor) -> torch.Tensor:
    """`[B, H, W]` view of a mask given as `[H, W]`, `[B, H, W]` or `[B, 1, H, W]`."""
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def composite(
    destination: torch.Tensor,
    source: torch.Tensor,
    x: int,
    y: int,
    mask: torch.Tensor | None,
    multiplier: int,
    resize_source: bool,
) -> torch.Tensor:
    """nodes_mask.composite on `[B, C, H, W]`: paste `source` at (x, y) (pixels; `multiplier` per
    element, 8 for latents), through `mask` resized bilinearly to the source. Writes into `destination`."""
    if resize_source:
        source = F.interpolate(source, size=(destination.shape[2], destination.shape[3]), mode="bilinear")
    source = repeat_to_batch_size(source, destination.shape[0])
    x = max(-source.shape[3] * multiplier, min(x, destination.shape[3] * multiplier))
    y = max(-source.shape[2] * multiplier, min(y, destination.shape[2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[3], top + source.shape[2]
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = F.interpolate(batched(mask)[:, None], size=(source.shape[2], source.shape[3]), mode="bilinear")
        mask = repeat_to_batch_size(mask, source.shape[0])
    # only the part of the source that lands inside the destination
    visible_width = destination.shape[3] - left + min(0, x)
    visible_height = destination.shape[2] - top + min(0, y)
    mask = mask[:, :, :visible_height, :visible_width]
    source_portion = mask * source[:, :, :visible_height, :visible_width]
    destination_portion = (torch.ones_like(mask) - mask) * destination[:, :, top:bottom, left:right]
    destination[:, :, top:bottom, left:right] = source_portion + destination_portion
    return destination


def image_alpha_fix(destination: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """node_helpers.image_alpha_fix: an RGB destination under an RGBA source gets an opaque alpha;
    an RGBA source over an RGB destination loses its alpha."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., : destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        source = F.pad(source, (0, 1))
        source[..., -1] = 1.0
    return destination, source


class LatentCompositeMasked(Node):
    """Paste a latent into another at (x, y) pixels through an optional mask."""

    CATEGORY = "latent"
    INPUTS = (
        Socket("destination", LATENT),
        Socket("source", LATENT),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=8),
        Boolean("resize_source", False),
        Socket("mask", MASK, optional=True),
    )
    OUTPUTS = (Output(LATENT),)

    def run(
        self,
        ctx: RunContext,
        destination: Latent,
        source: Latent,
        x: int,
        y: int,
        resize_source: bool,
        mask: torch.Tensor | None = None,
    ) -> tuple[Latent]:
        out = destination.copy()
        target = destination["samples"].clone()
        out["samples"] = composite(target, source["samples"], x, y, mask, 8, resize_source)
        return (out,)


class ImageCompositeMasked(Node):
    """Paste an image into another at (x, y) through an optional mask."""

    CATEGORY = "image"
    INPUTS = (
        Socket("destination", IMAGE),
        Socket("source", IMAGE),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=1),
        Boolean("resize_source", False),
        Socket("mask", MASK, optional=True),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self,
        ctx: RunContext,
        destination: torch.Tensor,
        source: torch.Tensor,
        x: int,
        y: int,
        resize_source: bool,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        destination, source = image_alpha_fix(destination, source)
        target = destination.clone().movedim(-1, 1)
        return (composite(target, source.movedim(-1, 1), x, y, mask, 1, resize_source).movedim(1, -1),)


class MaskToImage(Node):
    """Turn a mask into a grey image (the mask in all three channels)."""

    DISPLAY_NAME = "Convert Mask to Image"
    CATEGORY = "mask"
    INPUTS = (Socket("mask", MASK),)
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (batched(mask)[..., None].expand(-1, -1, -1, 3),)


class ImageToMask(Node):
    """Take one channel of an image as a mask."""

    DISPLAY_NAME = "Convert Image to Mask"
    CATEGORY = "mask"
    INPUTS = (Socket("image", IMAGE), Combo("channel", choices=CHANNELS))
    OUTPUTS = (Output(MASK),)

    def run(self, ctx: RunContext, image: torch.Tensor, channel: str) -> tuple[torch.Tensor]:
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"channel: the image has {image.shape[-1]} channels, no {channel} channel")
        return (image[:, :, :, index],)


class ImageColorToMask(Node):
    """A mask of the pixels whose 8-bit colour is exactly `color` (0xRRGGBB): 255 there, 0 elsewhere."""

    CATEGORY = "mask"
    INPUTS = (Socket("image", IMAGE), Int("color", 0, min=0, max=0xFFFFFF, step=1, display="color"))
    OUTPUTS = (Output(MASK),)

    def run(self, ctx: RunContext, image: torch.Tensor, color: int) -> tuple[torch.Tensor]:
        rgb = (torch.clamp(image, 0, 1.0) * 255.0).round().to(torch.int)
        packed = (rgb[:, :, :, 0] << 16) + (rgb[:, :, :, 1] << 8) + rgb[:, :, :, 2]
        # 255, not 1: ComfyUI's value, kept so workflows that threshold it behave the same
        return (torch.where(packed == color, 255, 0).float(),)


class SolidMask(Node):
    """A mask of one value everywhere."""

    CATEGORY = "mask"
    INPUTS = (
        Float("value", 1.0, min=0.0, max=1.0, step=0.01),
        Int("width", 512, min=1, max=MAX_RESOLUTION, step=1),
        Int("height", 512, min=1, max=MAX_RESOLUTION, step=1),
    )
    OUTPUTS = (Output(MASK),)

    def run(self, ctx: RunContext, value: float, width: int, height: int) -> tuple[torch.Tensor]:
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask(Node):
    """1 − mask."""

    CATEGORY = "mask"
    INPUTS = (Socket("mask", MASK),)
    OUTPUTS = (Output(MASK),)

    def run(self, ctx: RunContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - mask,)


class CropMask(Node):
    """Crop a mask to width × height at (x, y)."""

    CATEGORY = "mask"
    INPUTS = (
        Socket("mask", MASK),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("width", 512, min=1, max=MAX_RESOLUTION, step=1),
        Int("height", 512, min=1, max=MAX_RESOLUTION, step=1),
    )
    OUTPUTS = (Output(MASK),)

    def run(
        self, ctx: RunContext, mask: torch.Tensor, x: int, y: int, width: int, height: int
    ) -> tuple[torch.Tensor]:
        return (batched(mask)[:, y : y + height, x : x + width],)


MASK_OPERATIONS = ("multiply", "add", "subtract", "and", "or", "xor")


class MaskComposite(Node):
    """Combine a source mask into a destination at (x, y) by an operation, clamped to [0, 1]."""

    CATEGORY = "mask"
    INPUTS = (
        Socket("destination", MASK),
        Socket("source", MASK),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=1),
        Combo("operation", choices=MASK_OPERATIONS),
    )
    OUTPUTS = (Output(MASK),)

    def run(
        self, ctx: RunContext, destination: torch.Tensor, source: torch.Tensor, x: int, y: int, operation: str
    ) -> tuple[torch.Tensor]:
        dest, src = batched(destination), batched(source)
        output = dest.clone()
        right, bottom = min(x + src.shape[-1], dest.shape[-1]), min(y + src.shape[-2], dest.shape[-2])
        if right <= x or bottom <= y:  # placed outside the destination (ComfyUI fails on a shape error)
            return (torch.clamp(output, 0.0, 1.0),)
        a = dest[:, y:bottom, x:right]
        b = src[:, : bottom - y, : right - x]
        if operation == "multiply":
            part = a * b
        elif operation == "add":
            part = a + b
        elif operation == "subtract":
            part = a - b
        else:  # the logical ones work on the rounded masks
            logical = {"and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor}[operation]
            part = logical(a.round().bool(), b.round().bool()).float()
        output[:, y:bottom, x:right] = part
        return (torch.clamp(output, 0.0, 1.0),)


class FeatherMask(Node):
    """Fade a mask's edges linearly over the given widths (ComfyUI's off-by-one on right and bottom kept)."""

    CATEGORY = "mask"
    INPUTS = (
        Socket("mask", MASK),
        Int("left", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("top", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("right", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("bottom", 0, min=0, max=MAX_RESOLUTION, step=1),
    )
    OUTPUTS = (Output(MASK),)

    def run(
        self, ctx: RunContext, mask: torch.Tensor, left: int, top: int, right: int, bottom: int
    ) -> tuple[torch.Tensor]:
        out = batched(mask).clone()
        left, right = min(left, out.shape[-1]), min(right, out.shape[-1])
        top, bottom = min(top, out.shape[-2]), min(bottom, out.shape[-2])
        for x in range(left):
            out[:, :, x] *= (x + 1.0) / left
        # ComfyUI indexes `-x` from x = 0: column 0 (the left edge) gets 1/right, column W−right stays
        for x in range(right):
            out[:, :, -x] *= (x + 1) / right
        for y in range(top):
            out[:, y, :] *= (y + 1) / top
        for y in range(bottom):
            out[:, -y, :] *= (y + 1) / bottom
        return (out,)


class GrowMask(Node):
    """Grow (or with a negative value shrink) a mask by whole pixels; tapered corners grow diamond-shaped."""

    CATEGORY = "mask"
    INPUTS = (
        Socket("mask", MASK),
        Int("expand", 0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1),
        Boolean("tapered_corners", True),
    )
    OUTPUTS = (Output(MASK),)

    def run(
        self, ctx: RunContext, mask: torch.Tensor, expand: int, tapered_corners: bool
    ) -> tuple[torch.Tensor]:
        return (grow(batched(mask), expand, tapered_corners),)


def grow(masks: torch.Tensor, expand: int, tapered_corners: bool) -> torch.Tensor:
    """scipy.ndimage grey dilation (erosion for expand < 0) with a 3×3 footprint, |expand| times.

    scipy's default border mode, "reflect", repeats the edge pixel one step out, so a replicate pad
    of 1 gives the same result; the footprint is the cross, plus the corners unless tapered.
    """
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if not (tapered_corners and dy and dx)]
    out = masks.to(torch.float32)
    reduce = torch.amin if expand < 0 else torch.amax
    height, width = out.shape[-2:]
    for _ in range(abs(expand)):
        padded = F.pad(out[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        shifted = [padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in offsets]
        out = reduce(torch.stack(shifted), dim=0)
    return out


class ThresholdMask(Node):
    """1 where the mask is above the value, else 0."""

    CATEGORY = "mask"
    INPUTS = (Socket("mask", MASK), Float("value", 0.5, min=0.0, max=1.0, step=0.01))
    OUTPUTS = (Output(MASK),)

    def run(self, ctx: RunContext, mask: torch.Tensor, value: float) -> tuple[torch.Tensor]:
        return ((mask > value).float(),)


NODES: tuple[type[Node], ...] = (
    LatentCompositeMasked,
    ImageCompositeMasked,
    MaskToImage,
    ImageToMask,
    ImageColorToMask,
    SolidMask,
    InvertMask,
    CropMask,
    MaskComposite,
    FeatherMask,
    GrowMask,
    ThresholdMask,
)
