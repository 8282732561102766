"""Node: Canny (comfy_extras/nodes_canny.py), ComfyUI's one core ControlNet preprocessor."""

from __future__ import annotations

import torch

from nodegraph.node import Float, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE
from nodes.sd.canny import canny_edges


def _threshold(name: str, default: float) -> Float:
    return Float(name, default, min=0.01, max=0.99, step=0.01)


class Canny(Node):
    """Edge map of an image (white edges on black), e.g. as a canny ControlNet's hint."""

    CATEGORY = "image/preprocessors"
    INPUTS = (Socket("image", IMAGE), _threshold("low_threshold", 0.4), _threshold("high_threshold", 0.8))
    OUTPUTS = (Output(IMAGE),)

    def run(
        self, ctx: RunContext, image: torch.Tensor, low_threshold: float, high_threshold: float
    ) -> tuple[torch.Tensor]:
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError("image: expected an IMAGE [batch, height, width, channels]")
        if low_threshold > high_threshold:
            raise ValueError(
                f"low_threshold: {low_threshold} is above high_threshold {high_threshold}; make it lower"
            )
        edges = canny_edges(image.float().movedim(-1, 1), low_threshold, high_threshold)
        return (edges.repeat(1, 3, 1, 1).movedim(1, -1),)


NODES: tuple[type[Node], ...] = (Canny,)
