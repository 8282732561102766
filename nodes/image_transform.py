"""Image nodes: ImageScale, ImageScaleBy, ImageInvert, EmptyImage, ImageBatch (ComfyUI nodes.py).

IMAGE values are float32 `[B, H, W, C]` in [0, 1]; resizing works on `[B, C, H, W]` through
`common_upscale`, plus ComfyUI's Pillow Lanczos (which quantises to 8 bits on the way).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from nodegraph.node import MAX_RESOLUTION, Combo, Float, Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE
from nodes.sd.latent_ops import CROP_METHODS, center_crop, common_upscale

IMAGE_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.lanczos: each `[C, H, W]` image to uint8 (truncating), Pillow LANCZOS, back to float."""
    out = []
    for image in samples:
        pixels = np.clip(255.0 * image.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        resized = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS)
        array = np.array(resized).astype(np.float32) / 255.0
        if array.ndim == 2:
            array = array[..., None]
        out.append(torch.from_numpy(array).movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


def upscale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Resize an IMAGE `[B, H, W, C]` to (height, width) with ComfyUI's common_upscale semantics."""
    samples = image.movedim(-1, 1)
    if method == "lanczos":
        # crop exactly as common_upscale does, then resample with Pillow
        cropped = center_crop(samples, width, height) if crop == "center" else samples
        return lanczos(cropped, width, height).movedim(1, -1)
    return common_upscale(samples, width, height, method, crop).movedim(1, -1)


class ImageScale(Node):
    """Resize images to a width and height; a zero side follows the aspect ratio."""

    DISPLAY_NAME = "Upscale Image"
    CATEGORY = "image/upscaling"
    INPUTS = (
        Socket("image", IMAGE),
        Combo("upscale_method", choices=IMAGE_UPSCALE_METHODS),
        Int("width", 512, min=0, max=MAX_RESOLUTION, step=1),
        Int("height", 512, min=0, max=MAX_RESOLUTION, step=1),
        Combo("crop", choices=CROP_METHODS),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str
    ) -> tuple[torch.Tensor]:
        if width == 0 and height == 0:
            return (image,)
        if width == 0:
            width = max(1, round(image.shape[2] * height / image.shape[1]))
        elif height == 0:
            height = max(1, round(image.shape[1] * width / image.shape[2]))
        return (upscale_image(image, width, height, upscale_method, crop),)


class ImageScaleBy(Node):
    """Resize images by a factor (each side rounded to whole pixels)."""

    DISPLAY_NAME = "Upscale Image By"
    CATEGORY = "image/upscaling"
    INPUTS = (
        Socket("image", IMAGE),
        Combo("upscale_method", choices=IMAGE_UPSCALE_METHODS),
        Float("scale_by", 1.0, min=0.01, max=8.0, step=0.01),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, upscale_method: str, scale_by: float
    ) -> tuple[torch.Tensor]:
        width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
        return (upscale_image(image, width, height, upscale_method, "disabled"),)


class ImageInvert(Node):
    """Invert images: 1 − pixel."""

    DISPLAY_NAME = "Invert Image"
    CATEGORY = "image"
    INPUTS = (Socket("image", IMAGE),)
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (1.0 - image,)


class EmptyImage(Node):
    """A batch of images filled with one colour (0xRRGGBB)."""

    CATEGORY = "image"
    INPUTS = (
        Int("width", 512, min=1, max=MAX_RESOLUTION, step=1),
        Int("height", 512, min=1, max=MAX_RESOLUTION, step=1),
        Int("batch_size", 1, min=1, max=4096),
        Int("color", 0, min=0, max=0xFFFFFF, step=1, display="color"),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, width: int, height: int, batch_size: int, color: int
    ) -> tuple[torch.Tensor]:
        channels = [
            torch.full([batch_size, height, width, 1], ((color >> shift) & 0xFF) / 0xFF)
            for shift in (16, 8, 0)
        ]
        return (torch.cat(channels, dim=-1),)


class ImageBatch(Node):
    """Join two image batches; image2 is resized (bilinear, centre crop) to image1's size if needed."""

    DISPLAY_NAME = "Batch Images"
    CATEGORY = "image"
    INPUTS = (Socket("image1", IMAGE), Socket("image2", IMAGE))
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
        if image1.shape[-1] != image2.shape[-1]:
            # ComfyUI pads the 3-channel one with an opaque alpha channel
            if image1.shape[-1] == 3:
                image1 = torch.cat([image1, torch.ones_like(image1[..., :1])], dim=-1)
            if image2.shape[-1] == 3:
                image2 = torch.cat([image2, torch.ones_like(image2[..., :1])], dim=-1)
        if image1.shape[1:] != image2.shape[1:]:
            image2 = common_upscale(
                image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear", "center"
            ).movedim(1, -1)
        return (torch.cat((image1, image2), dim=0),)


NODES: tuple[type[Node], ...] = (ImageScale, ImageScaleBy, ImageInvert, EmptyImage, ImageBatch)
