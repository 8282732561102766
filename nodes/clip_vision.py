"""CLIP vision nodes: CLIPVisionLoader, CLIPVisionEncode, unCLIPConditioning, unCLIPCheckpointLoader
(ComfyUI nodes.py: ids, inputs, outputs; the numerics in `nodes.sd.clip_vision`).

ComfyUI's unCLIP checkpoints (stable-diffusion-2-1-unclip) are SD2.x models, which nodegraph does
not run: unCLIPCheckpointLoader refuses them, and any checkpoint without an unCLIP image encoder,
naming the file and its family. unCLIPConditioning adds ComfyUI's `unclip_conditioning` entry to
each conditioning entry, which only unCLIP models read (SD1.x and SDXL ignore it, as in ComfyUI).
"""

from __future__ import annotations

import torch

from nodegraph.node import Combo, FileChoice, Float, Node, Output, RunContext, Socket
from nodegraph.types import CLIP, CLIP_VISION, CLIP_VISION_OUTPUT, CONDITIONING, IMAGE, MODEL, VAE
from nodes.sd.clip_vision import (
    UNCLIP_IMAGE_ENCODER,
    ClipVision,
    ClipVisionOutput,
    encode_image,
    load_clip_vision,
)
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sd.safetensors_file import CheckpointError
from nodes.sd.values import Conditioning

FAMILY_NAMES = {"sd15": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}


class CLIPVisionLoader(Node):
    """Load a CLIP vision model (image encoder) from models/clip_vision."""

    DISPLAY_NAME = "Load CLIP Vision"
    CATEGORY = "loaders"
    INPUTS = (FileChoice("clip_name", folder="clip_vision"),)
    OUTPUTS = (Output(CLIP_VISION),)

    def run(self, ctx: RunContext, clip_name: str) -> tuple[ClipVision]:
        path = ctx.env.folders.resolve("clip_vision", clip_name)
        try:
            return (load_clip_vision(path, clip_name),)
        except CheckpointError as exc:
            raise ValueError(f"CLIPVisionLoader: clip_name: {exc}") from exc


class CLIPVisionEncode(Node):
    """Encode images with a CLIP vision model (resized and centre-cropped, or squashed, to its size)."""

    DISPLAY_NAME = "CLIP Vision Encode"
    CATEGORY = "conditioning"
    INPUTS = (
        Socket("clip_vision", CLIP_VISION),
        Socket("image", IMAGE),
        Combo("crop", choices=("center", "none")),
    )
    OUTPUTS = (Output(CLIP_VISION_OUTPUT),)

    def run(
        self, ctx: RunContext, clip_vision: ClipVision, image: torch.Tensor, crop: str
    ) -> tuple[ClipVisionOutput]:
        if not isinstance(clip_vision, ClipVision):
            raise ValueError("CLIPVisionEncode: input clip_vision needs a CLIP_VISION from CLIPVisionLoader")
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError("CLIPVisionEncode: input image is not an RGB image batch [B, H, W, C]")
        return (encode_image(clip_vision, image, crop == "center"),)


class unCLIPConditioning(Node):  # noqa: N801 - ComfyUI's node id
    """Attach a CLIP vision embedding to the conditioning for unCLIP models (others ignore it)."""

    CATEGORY = "conditioning"
    INPUTS = (
        Socket("conditioning", CONDITIONING),
        Socket("clip_vision_output", CLIP_VISION_OUTPUT),
        Float("strength", 1.0, min=-10.0, max=10.0, step=0.01),
        Float("noise_augmentation", 0.0, min=0.0, max=1.0, step=0.01),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        conditioning: Conditioning,
        clip_vision_output: ClipVisionOutput,
        strength: float,
        noise_augmentation: float,
    ) -> tuple[Conditioning]:
        if not isinstance(clip_vision_output, ClipVisionOutput):
            raise ValueError("unCLIPConditioning: input clip_vision_output needs CLIPVisionEncode's output")
        if strength == 0:
            return (conditioning,)
        entry = {
            "clip_vision_output": clip_vision_output,
            "strength": strength,
            "noise_augmentation": noise_augmentation,
        }
        out: Conditioning = []
        for embedding, options in conditioning:
            new = options.copy()
            new["unclip_conditioning"] = [*options.get("unclip_conditioning", []), entry]
            out.append((embedding, new))
        return (out,)


class unCLIPCheckpointLoader(Node):  # noqa: N801 - ComfyUI's node id
    """Load an unCLIP checkpoint: its model, CLIP, VAE and image encoder (SD2.x-based: refused here)."""

    CATEGORY = "loaders"
    INPUTS = (FileChoice("ckpt_name", folder="checkpoints"),)
    OUTPUTS = (Output(MODEL), Output(CLIP), Output(VAE), Output(CLIP_VISION))

    def run(self, ctx: RunContext, ckpt_name: str) -> tuple[ModelHandle, ClipHandle, VaeHandle, ClipVision]:
        from nodes.sd.checkpoint import open_source
        from nodes.sd.convert_sdxl import checkpoint_family

        path = ctx.env.folders.resolve("checkpoints", ckpt_name)
        unsupported = "nodegraph runs SD1.x and SDXL models only"
        if path.is_file() and any(k.startswith(UNCLIP_IMAGE_ENCODER) for k in open_source(path).keys()):
            raise ValueError(
                f"unCLIPCheckpointLoader: '{ckpt_name}' is an SD2.x unCLIP checkpoint "
                f"(stable-diffusion-2-1-unclip family); {unsupported}"
            )
        family = FAMILY_NAMES.get(checkpoint_family(path), "unrecognised")
        if family == "SD2.x":
            raise ValueError(f"unCLIPCheckpointLoader: '{ckpt_name}' is an SD2.x checkpoint; {unsupported}")
        raise ValueError(
            f"unCLIPCheckpointLoader: '{ckpt_name}' is an {family} checkpoint without an unCLIP image "
            "encoder; load it with CheckpointLoaderSimple and an image encoder with CLIPVisionLoader"
        )


NODES: tuple[type[Node], ...] = (
    CLIPVisionLoader,
    CLIPVisionEncode,
    unCLIPConditioning,
    unCLIPCheckpointLoader,
)
