"""Nodes: UpscaleModelLoader and ImageUpscaleWithModel (ComfyUI's `comfy_extras/nodes_upscale_model.py`).

Only ESRGAN-family (RRDBNet) models are understood (`nodes/sd/esrgan.py`); ComfyUI reads more
architectures through spandrel. The model computes on the engine's device (`nodes/sd/device.py`)
in fp32. The upscale runs on 512-pixel tiles overlapping by 32, blended with ComfyUI's feathered
weights (`nodes/sd/vae_tiled.tiled_scale`), the tile halving on an out-of-memory error down to
128, as ComfyUI does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nodegraph.node import FileChoice, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE, UPSCALE_MODEL
from nodes.sd import vae_tiled
from nodes.sd.device import place, placement
from nodes.sd.esrgan import UpscaleModel, UpscaleModelError, load_upscale_model

FOLDER = "upscale_models"
TILE = 512
OVERLAP = 32
SMALLEST_TILE = 128


class UpscaleModelLoader(Node):
    """Load an ESRGAN-family upscale model (RRDBNet: RealESRGAN, 4x-UltraSharp, ...) from upscale_models."""

    DISPLAY_NAME = "Load Upscale Model"
    CATEGORY = "loaders"
    PYTHON_MODULE = "comfy_extras.nodes_upscale_model"
    INPUTS = (FileChoice("model_name", folder=FOLDER),)
    OUTPUTS = (Output(UPSCALE_MODEL),)

    def run(self, ctx: RunContext, model_name: str) -> tuple[UpscaleModel]:
        path = ctx.env.folders.resolve(FOLDER, model_name)
        return (load_upscale_model(path, model_name),)


class ImageUpscaleWithModel(Node):
    """Upscale an image with an upscale model, tile by tile (the model's own factor, e.g. 4x)."""

    DISPLAY_NAME = "Upscale Image (using Model)"
    CATEGORY = "image/upscaling"
    PYTHON_MODULE = "comfy_extras.nodes_upscale_model"
    INPUTS = (Socket("upscale_model", socket_type=UPSCALE_MODEL), Socket("image", socket_type=IMAGE))
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, upscale_model: UpscaleModel, image: torch.Tensor) -> tuple[torch.Tensor]:
        # 1. An RGBA image: the model sees RGB, the alpha is scaled bilinearly (as ComfyUI does).
        alpha = image[..., 3:4] if image.ndim == 4 and image.shape[-1] == 4 else None
        if alpha is not None:
            image = image[..., :3]
        channels = upscale_model.config.in_channels
        if image.ndim != 4 or image.shape[-1] != channels:
            raise UpscaleModelError(
                f"ImageUpscaleWithModel: '{upscale_model.source}' takes an image of shape "
                f"[B, H, W, {channels}], got {list(image.shape)}"
            )
        # 2. The model on the engine's device, in fp32 (ComfyUI feeds it `a.float()`); the image
        #    stays on the CPU and only tiles travel.
        #    Afterwards it goes back to the CPU (ComfyUI does the same): the cached loader output
        #    would otherwise keep it in GPU memory beside the diffusion models.
        place(upscale_model.net, placement(ctx.env).device, torch.float32)
        try:
            # 3. [B, H, W, C] -> [B, C, H, W], tiled upscale, clamp, back.
            upscaled = upscale_tiled(upscale_model, image.movedim(-1, -3), _progress(ctx))
        except torch.OutOfMemoryError as exc:
            raise UpscaleModelError(
                f"ImageUpscaleWithModel: not enough device memory to upscale a {image.shape[2]}x"
                f"{image.shape[1]} image with '{upscale_model.source}', even in {SMALLEST_TILE} px tiles"
            ) from exc
        finally:
            place(upscale_model.net, torch.device("cpu"), torch.float32)
        result = torch.clamp(upscaled.movedim(-3, -1), min=0.0, max=1.0)
        if alpha is not None:
            size = (result.shape[1], result.shape[2])
            scaled = F.interpolate(alpha.movedim(-1, -3).float(), size=size, mode="bilinear")
            result = torch.cat((result, scaled.movedim(-3, -1)), dim=-1)
        return (result.contiguous(),)


def upscale_tiled(
    model: UpscaleModel, pixels: torch.Tensor, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """[B, C, H, W] -> [B, C', sH, sW], not clamped: 512 px tiles, 32 px overlap, halving on OOM."""
    parameter = next(model.net.parameters())

    def run_tile(tile: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model.net(tile.to(parameter.device, torch.float32))
        return out.cpu()

    tile = TILE
    with torch.inference_mode():
        while True:
            total = pixels.shape[0] * vae_tiled.tile_count(
                pixels.shape[2], pixels.shape[3], [(tile, tile)], OVERLAP
            )
            tick = vae_tiled.ticker(progress, total)
            try:
                return vae_tiled.tiled_scale(
                    pixels.float(),
                    run_tile,
                    (tile, tile),
                    OVERLAP,
                    model.scale,
                    model.config.out_channels,
                    tick,
                )
            except torch.OutOfMemoryError:
                tile //= 2
                if tile < SMALLEST_TILE:
                    raise


def _progress(ctx: RunContext) -> Callable[[int, int], None]:
    """Report each finished tile to the canvas and stop between tiles when interrupted."""

    def report(done: int, total: int) -> None:
        ctx.progress(done, total)
        ctx.check_interrupt()

    return report


NODES: tuple[type[Node], ...] = (UpscaleModelLoader, ImageUpscaleWithModel)
