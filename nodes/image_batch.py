"""More core image nodes (ComfyUI nodes_images.py / nodes_post_processing.py ids, inputs and math):
RepeatImageBatch, ImageFromBatch, GetImageSize, ImageScaleToTotalPixels, ImageFlip, ImageRotate."""

from __future__ import annotations

import math

import torch

from nodegraph.node import Combo, Float, Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE, INT
from nodes.image_transform import IMAGE_UPSCALE_METHODS, upscale_image


class RepeatImageBatch(Node):
    """Repeat an image batch `amount` times."""

    CATEGORY = "image/batch"
    INPUTS = (Socket("image", IMAGE), Int("amount", 1, min=1, max=4096))
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor, amount: int) -> tuple[torch.Tensor]:
        return (image.repeat((amount, 1, 1, 1)),)


class ImageFromBatch(Node):
    """Take `length` images of a batch from `batch_index` on (both clamped to the batch)."""

    CATEGORY = "image/batch"
    INPUTS = (
        Socket("image", IMAGE),
        Int("batch_index", 0, min=0, max=4095),
        Int("length", 1, min=1, max=4096),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor, batch_index: int, length: int) -> tuple[torch.Tensor]:
        batch_index = min(image.shape[0] - 1, batch_index)
        length = min(image.shape[0] - batch_index, length)
        return (image[batch_index : batch_index + length].clone(),)


class GetImageSize(Node):
    """The width, height and batch size of images."""

    DISPLAY_NAME = "Get Image Size"
    CATEGORY = "image"
    INPUTS = (Socket("image", IMAGE),)
    OUTPUTS = (Output(INT, name="width"), Output(INT, name="height"), Output(INT, name="batch_size"))

    def run(self, ctx: RunContext, image: torch.Tensor) -> tuple[int, int, int]:
        return int(image.shape[2]), int(image.shape[1]), int(image.shape[0])


class ImageScaleToTotalPixels(Node):
    """Resize images to about `megapixels` million pixels (×1024×1024), keeping the aspect ratio."""

    DISPLAY_NAME = "Scale Image to Total Pixels"
    CATEGORY = "image/upscaling"
    INPUTS = (
        Socket("image", IMAGE),
        Combo("upscale_method", choices=IMAGE_UPSCALE_METHODS),
        Float("megapixels", 1.0, min=0.01, max=16.0, step=0.01),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, upscale_method: str, megapixels: float
    ) -> tuple[torch.Tensor]:
        total = int(megapixels * 1024 * 1024)
        scale_by = math.sqrt(total / (image.shape[2] * image.shape[1]))
        width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
        return (upscale_image(image, width, height, upscale_method, "disabled"),)


class ImageFlip(Node):
    """Flip images vertically (x-axis) or horizontally (y-axis)."""

    CATEGORY = "image/transform"
    INPUTS = (
        Socket("image", IMAGE),
        Combo("flip_method", choices=("x-axis: vertically", "y-axis: horizontally")),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor, flip_method: str) -> tuple[torch.Tensor]:
        return (torch.flip(image, dims=[1 if flip_method.startswith("x") else 2]),)


class ImageRotate(Node):
    """Rotate images clockwise by 90, 180 or 270 degrees."""

    CATEGORY = "image/transform"
    INPUTS = (
        Socket("image", IMAGE),
        Combo("rotation", choices=("none", "90 degrees", "180 degrees", "270 degrees")),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor, rotation: str) -> tuple[torch.Tensor]:
        turns = {"90": 1, "180": 2, "270": 3}.get(rotation.split(" ")[0], 0)
        return (torch.rot90(image, k=turns, dims=[2, 1]),)


NODES: tuple[type[Node], ...] = (
    RepeatImageBatch,
    ImageFromBatch,
    GetImageSize,
    ImageScaleToTotalPixels,
    ImageFlip,
    ImageRotate,
)
