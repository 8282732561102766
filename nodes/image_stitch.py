"""ImageStitch (comfy_extras/nodes_images.py, upstreamed from KJNodes): image2 joined to image1's side,
with ComfyUI's batch, size, channel and spacing rules."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from nodegraph.node import Boolean, Combo, Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE
from nodes.image_transform import upscale_image

COLOURS: dict[str, float | tuple[float, float, float]] = {
    "white": 1.0,
    "black": 0.0,
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}


def _extend_batch(image: torch.Tensor, batch: int) -> torch.Tensor:
    """A shorter batch repeats its last image."""
    if image.shape[0] >= batch:
        return image
    return torch.cat([image, image[-1:].repeat(batch - image.shape[0], 1, 1, 1)])


def _pad_centred(image: torch.Tensor, size: int, dim: int, value: float) -> torch.Tensor:
    """Pad dimension 1 (height) or 2 (width) to `size`, the odd pixel at the end."""
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    before, after = missing // 2, missing - missing // 2
    pads = (0, 0, 0, 0, before, after) if dim == 1 else (0, 0, before, after)
    return F.pad(image, pads, mode="constant", value=value)


def _with_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Add channels of ones (an opaque alpha) up to `channels`."""
    missing = channels - image.shape[-1]
    if missing <= 0:
        return image
    return torch.cat([image, torch.ones(*image.shape[:-1], missing, device=image.device)], dim=-1)


def _spacing(shape: tuple[int, int, int, int], colour: float | tuple[float, float, float]) -> torch.Tensor:
    spacing = torch.zeros(shape)
    if isinstance(colour, tuple):
        for i, c in enumerate(colour[: shape[-1]]):
            spacing[..., i] = c
    else:
        spacing[..., : min(3, shape[-1])] = colour
    if shape[-1] == 4:
        spacing[..., 3] = 1.0
    return spacing


class ImageStitch(Node):
    """Stitch image2 to image1 on one side, optionally matching its size and with a spacing strip."""

    DISPLAY_NAME = "Image Stitch"
    CATEGORY = "image/transform"
    INPUTS = (
        Socket("image1", IMAGE),
        Combo("direction", choices=("right", "down", "left", "up"), default="right"),
        Boolean("match_image_size", True),
        Int("spacing_width", 0, min=0, max=1024, step=2),
        Combo("spacing_color", choices=tuple(COLOURS), default="white"),
        Socket("image2", IMAGE, optional=True),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self,
        ctx: RunContext,
        image1: torch.Tensor,
        direction: str,
        match_image_size: bool,
        spacing_width: int,
        spacing_color: str,
        image2: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        if image2 is None:
            return (image1,)
        for name, image in (("image1", image1), ("image2", image2)):
            if not isinstance(image, torch.Tensor) or image.ndim != 4:
                raise ValueError(f"ImageStitch: input {name} is not an image batch [B, H, W, C]")
        batch = max(image1.shape[0], image2.shape[0])
        image1, image2 = _extend_batch(image1, batch), _extend_batch(image2, batch)
        sideways = direction in ("left", "right")
        colour = COLOURS[spacing_color]
        if match_image_size:
            aspect = image2.shape[2] / image2.shape[1]
            if sideways:
                height, width = image1.shape[1], int(image1.shape[1] * aspect)
            else:
                height, width = int(image1.shape[2] / aspect), image1.shape[2]
            image2 = upscale_image(image2, width, height, "lanczos", "disabled")
        else:  # pad the other dimension to match, centred, in a grey colour's value (0 for a colour)
            value = colour if isinstance(colour, float) else 0.0
            dim = 1 if sideways else 2
            size = max(image1.shape[dim], image2.shape[dim])
            image1, image2 = _pad_centred(image1, size, dim, value), _pad_centred(image2, size, dim, value)
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = _with_channels(image1, channels), _with_channels(image2, channels)
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            spacing_width += spacing_width % 2
            if sideways:
                shape = (batch, max(image1.shape[1], image2.shape[1]), spacing_width, channels)
            else:
                shape = (batch, spacing_width, max(image1.shape[2], image2.shape[2]), channels)
            parts.insert(1, _spacing(shape, colour).to(image1.device))
        return (torch.cat(parts, dim=2 if sideways else 1),)


NODES: tuple[type[Node], ...] = (ImageStitch,)
