"""Nodes: VAEDecodeTiled, VAEEncodeTiled (ComfyUI's "VAE Decode (Tiled)" / "VAE Encode (Tiled)").

Declarations and the size handling follow ComfyUI 0.3.64's `nodes.py`; the tiling math is in
`nodes/sd/vae_tiled.py`. The temporal inputs only matter to video VAEs; ComfyUI accepts and
ignores them for image VAEs, and so do we.
"""

from __future__ import annotations

from typing import Any

import torch

from nodegraph.node import Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE, LATENT, VAE
from nodes.sd import vae_tiled
from nodes.sd.device import on_device
from nodes.sd.handles import VaeHandle
from nodes.sd.values import Latent


def _temporal_inputs(verb: str) -> tuple[Int, Int]:
    return (
        Int(
            "temporal_size",
            64,
            min=8,
            max=4096,
            step=4,
            tooltip=f"Only used for video VAEs: Amount of frames to {verb} at a time.",
        ),
        Int(
            "temporal_overlap",
            8,
            min=4,
            max=4096,
            step=4,
            tooltip="Only used for video VAEs: Amount of frames to overlap.",
        ),
    )


class VAEDecodeTiled(Node):
    """Decode latents to images tile by tile, blending the overlaps (less memory for large images)."""

    DISPLAY_NAME = "VAE Decode (Tiled)"
    CATEGORY = "_for_testing"
    INPUTS = (
        Socket("samples", socket_type=LATENT),
        Socket("vae", socket_type=VAE),
        Int("tile_size", 512, min=64, max=4096, step=32),
        Int("overlap", 64, min=0, max=4096, step=32),
        *_temporal_inputs("decode"),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self,
        ctx: RunContext,
        samples: Latent,
        vae: VaeHandle,
        tile_size: int,
        overlap: int,
        temporal_size: int,
        temporal_overlap: int,
    ) -> tuple[torch.Tensor]:
        if tile_size < overlap * 4:  # ComfyUI keeps the overlap at most a quarter of the tile
            overlap = tile_size // 4
        tile = tile_size // vae_tiled.DOWNSCALE
        image = vae_tiled.decode_tiled(
            on_device(ctx.env, vae.vae, "vae"),
            samples["samples"],
            tile_x=tile,
            tile_y=tile,
            overlap=overlap // vae_tiled.DOWNSCALE,
            progress=_progress(ctx),
        )
        return (image,)


class VAEEncodeTiled(Node):
    """Encode images to latents tile by tile, blending the overlaps (less memory for large images)."""

    DISPLAY_NAME = "VAE Encode (Tiled)"
    CATEGORY = "_for_testing"
    INPUTS = (
        Socket("pixels", socket_type=IMAGE),
        Socket("vae", socket_type=VAE),
        Int("tile_size", 512, min=64, max=4096, step=64),
        Int("overlap", 64, min=0, max=4096, step=32),
        *_temporal_inputs("encode"),
    )
    OUTPUTS = (Output(LATENT),)

    def run(
        self,
        ctx: RunContext,
        pixels: torch.Tensor,
        vae: VaeHandle,
        tile_size: int,
        overlap: int,
        temporal_size: int,
        temporal_overlap: int,
    ) -> tuple[Latent]:
        # ComfyUI passes encode sizes in image pixels and does not clamp the overlap here.
        latent = vae_tiled.encode_tiled(
            on_device(ctx.env, vae.vae, "vae"),
            pixels,
            tile_x=tile_size,
            tile_y=tile_size,
            overlap=overlap,
            progress=_progress(ctx),
        )
        return ({"samples": latent},)


def _progress(ctx: RunContext) -> Any:
    """Report each finished tile to the canvas and stop between tiles when interrupted."""

    def report(done: int, total: int) -> None:
        ctx.progress(done, total)
        ctx.check_interrupt()

    return report


NODES: tuple[type[Node], ...] = (VAEDecodeTiled, VAEEncodeTiled)
