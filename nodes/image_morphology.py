"""Morphology (comfy_extras/nodes_morphology.py, shown as "ImageMorphology"): kornia's grey-scale
morphology with a square kernel of ones on every channel, as ComfyUI runs it."""

from __future__ import annotations

import torch

from nodegraph.node import Combo, Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE

OPERATIONS = ("erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat")


class Morphology(Node):
    """Erode, dilate, open, close, gradient, top-hat or bottom-hat an image with a square kernel."""

    DISPLAY_NAME = "ImageMorphology"
    CATEGORY = "image/postprocessing"
    INPUTS = (
        Socket("image", IMAGE),
        Combo("operation", choices=OPERATIONS),
        Int("kernel_size", 3, min=3, max=999, step=1),
    )
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, operation: str, kernel_size: int
    ) -> tuple[torch.Tensor]:
        from kornia import morphology

        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError("Morphology: input image is not an image batch [B, H, W, C]")
        ops = {
            "erode": morphology.erosion,
            "dilate": morphology.dilation,
            "open": morphology.opening,
            "close": morphology.closing,
            "gradient": morphology.gradient,
            "top_hat": morphology.top_hat,
            "bottom_hat": morphology.bottom_hat,
        }
        kernel = torch.ones(kernel_size, kernel_size, device=image.device)
        out: torch.Tensor = ops[operation](image.movedim(-1, 1), kernel)
        return (out.movedim(1, -1).contiguous(),)


NODES: tuple[type[Node], ...] = (Morphology,)
