"""Image nodes: ImageCrop (nodes.py), ImageBlend, ImageBlur, ImageSharpen, ImageQuantize
(comfy_extras/nodes_post_processing.py), MaskPreview (nodes_mask.py): ComfyUI's ids, inputs and math.

IMAGE values are float32 `[B, H, W, C]` in [0, 1]; filters run on `[B, C, H, W]` with reflect padding,
as ComfyUI's do.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from PIL import Image

from nodegraph.node import MAX_RESOLUTION, Combo, Float, Hidden, Int, Node, Output, Result, RunContext, Socket
from nodegraph.types import IMAGE, MASK
from nodes.image import preview_prefix, save_images
from nodes.mask import batched, image_alpha_fix
from nodes.sd.latent_ops import common_upscale


class ImageCrop(Node):
    """Crop images to width × height at (x, y); the origin stays inside the image."""

    DISPLAY_NAME = "Image Crop"
    CATEGORY = "image/transform"
    INPUTS = (
        Socket("image", IMAGE),
        Int("width", 512, min=1, max=MAX_RESOLUTION, step=1),
        Int("height", 512, min=1, max=MAX_RESOLUTION, step=1),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=1),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=1),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, width: int, height: int, x: int, y: int
    ) -> tuple[torch.Tensor]:
        x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
        return (image[:, y : y + height, x : x + width, :],)


BLEND_MODES = ("normal", "multiply", "screen", "overlay", "soft_light", "difference")


def blended(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """The blended colour before mixing by blend_factor (nodes_post_processing.Blend.blend_mode)."""
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
    if mode == "difference":
        return a - b
    raise ValueError(f"blend_mode: unsupported mode {mode!r}")


class ImageBlend(Node):
    """Blend image2 over image1 with a blend mode and factor (image2 is resized to image1 if needed)."""

    DISPLAY_NAME = "Image Blend"
    CATEGORY = "image/postprocessing"
    INPUTS = (
        Socket("image1", IMAGE),
        Socket("image2", IMAGE),
        Float("blend_factor", 0.5, min=0.0, max=1.0, step=0.01),
        Combo("blend_mode", choices=BLEND_MODES),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self,
        ctx: RunContext,
        image1: torch.Tensor,
        image2: torch.Tensor,
        blend_factor: float,
        blend_mode: str,
    ) -> tuple[torch.Tensor]:
        image1, image2 = image_alpha_fix(image1, image2)
        if image1.shape != image2.shape:
            resized = common_upscale(
                image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bicubic", "center"
            )
            image2 = resized.movedim(1, -1)
        mixed = image1 * (1 - blend_factor) + blended(image1, image2, blend_mode) * blend_factor
        return (torch.clamp(mixed, 0, 1),)


def gaussian_kernel(kernel_size: int, sigma: float) -> torch.Tensor:
    """ComfyUI's kernel: a Gaussian over linspace(−1, 1) in both axes (not over pixel distances)."""
    x, y = torch.meshgrid(
        torch.linspace(-1, 1, kernel_size), torch.linspace(-1, 1, kernel_size), indexing="ij"
    )
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """Depthwise conv of `[B, H, W, C]` images with reflect padding, cropped back to their size."""
    channels = image.shape[-1]
    weights = kernel.repeat(channels, 1, 1).unsqueeze(1)
    x = F.pad(image.permute(0, 3, 1, 2), (radius, radius, radius, radius), "reflect")
    # ComfyUI pads twice (reflect, then the conv's zeros) and crops: the same numbers as one pad
    out = F.conv2d(x, weights, padding=kernel.shape[-1] // 2, groups=channels)[
        :, :, radius:-radius, radius:-radius
    ]
    return out.permute(0, 2, 3, 1)


class ImageBlur(Node):
    """Gaussian-blur images."""

    DISPLAY_NAME = "Image Blur"
    CATEGORY = "image/postprocessing"
    INPUTS = (
        Socket("image", IMAGE),
        Int("blur_radius", 1, min=1, max=31, step=1),
        Float("sigma", 1.0, min=0.1, max=10.0, step=0.1),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, blur_radius: int, sigma: float
    ) -> tuple[torch.Tensor]:
        if blur_radius == 0:
            return (image,)
        return (_filter(image, gaussian_kernel(blur_radius * 2 + 1, sigma), blur_radius),)


class ImageSharpen(Node):
    """Sharpen images (unsharp mask with ComfyUI's Gaussian kernel), clamped to [0, 1]."""

    DISPLAY_NAME = "Image Sharpen"
    CATEGORY = "image/postprocessing"
    INPUTS = (
        Socket("image", IMAGE),
        Int("sharpen_radius", 1, min=1, max=31, step=1),
        Float("sigma", 1.0, min=0.1, max=10.0, step=0.01),
        Float("alpha", 1.0, min=0.0, max=5.0, step=0.01),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, sharpen_radius: int, sigma: float, alpha: float
    ) -> tuple[torch.Tensor]:
        if sharpen_radius == 0:
            return (image,)
        size = sharpen_radius * 2 + 1
        kernel = gaussian_kernel(size, sigma) * -(alpha * 10)
        center = size // 2
        kernel[center, center] = kernel[center, center] - kernel.sum() + 1.0
        return (torch.clamp(_filter(image, kernel, sharpen_radius), 0, 1),)


DITHERS = ("none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16")


def _bayer_matrix(n: int) -> np.ndarray:
    if n == 0:
        return np.zeros((1, 1), "float32")
    q = 4**n
    m = q * _bayer_matrix(n - 1)
    block = np.block([[m - 1.5, m + 0.5], [m + 1.5, m - 0.5]])
    return np.asarray(block / q)


def _bayer(im: Image.Image, palette: Image.Image, order: int) -> Image.Image:
    """Ordered dithering onto `palette` (ComfyUI's Quantize.bayer)."""
    num_colors = len(palette.getpalette() or []) // 3
    spread = 2 * 256 / num_colors
    matrix = torch.from_numpy(spread * _bayer_matrix(int(math.log2(order))) + 0.5)
    pixels = torch.from_numpy(np.array(im).astype(np.float32))
    tiles = (math.ceil(pixels.shape[0] / matrix.shape[0]), math.ceil(pixels.shape[1] / matrix.shape[1]))
    tiled = matrix.tile(tiles).unsqueeze(-1)
    pixels.add_(tiled[: pixels.shape[0], : pixels.shape[1]]).clamp_(0, 255)
    dithered = Image.fromarray(pixels.to(torch.uint8).numpy())
    return dithered.quantize(palette=palette, dither=Image.Dither.NONE)


class ImageQuantize(Node):
    """Reduce images to a palette of at most `colors` colours (Pillow's median cut), optionally dithered."""

    DISPLAY_NAME = "Image Quantize"
    CATEGORY = "image/postprocessing"
    INPUTS = (
        Socket("image", IMAGE),
        Int("colors", 256, min=1, max=256, step=1),
        Combo("dither", choices=DITHERS),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor, colors: int, dither: str) -> tuple[torch.Tensor]:
        result = torch.zeros_like(image)
        for b in range(image.shape[0]):
            # 8 bits by truncation, as ComfyUI converts
            im = Image.fromarray((image[b, :, :, :3] * 255).to(torch.uint8).numpy(), mode="RGB")
            palette = im.quantize(colors=colors)  # Pillow needs the palette image first (Pillow #5836)
            if dither == "none":
                quantized = im.quantize(palette=palette, dither=Image.Dither.NONE)
            elif dither == "floyd-steinberg":
                quantized = im.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
            else:
                quantized = _bayer(im, palette, int(dither.split("-")[-1]))
            result[b, :, :, :3] = torch.from_numpy(np.array(quantized.convert("RGB"))).float() / 255
        return (result,)


class MaskPreview(Node):
    """Show masks as grey images in the canvas (saved to the temp folder)."""

    CATEGORY = "mask"
    OUTPUT_NODE = True
    INPUTS = (
        Socket("mask", MASK),
        Hidden("prompt", kind="PROMPT"),
        Hidden("extra_pnginfo", kind="EXTRA_PNGINFO"),
    )
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        mask: torch.Tensor,
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        images = batched(mask)[..., None].expand(-1, -1, -1, 3)
        saved = save_images(ctx.env, images, preview_prefix(), "temp", 4, prompt, extra_pnginfo)
        return Result(ui={"images": saved})


NODES: tuple[type[Node], ...] = (ImageCrop, ImageBlend, ImageBlur, ImageSharpen, ImageQuantize, MaskPreview)
