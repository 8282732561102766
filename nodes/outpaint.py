"""ImagePadForOutpaint (ComfyUI nodes.py): grow the canvas and mask the new border for inpainting."""

from __future__ import annotations

import torch

from nodegraph.node import MAX_RESOLUTION, Int, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE, MASK


def outpaint_mask(
    height: int, width: int, left: int, top: int, right: int, bottom: int, feathering: int
) -> torch.Tensor:
    """The padded canvas's mask [H', W']: 1 on the new border; inside the old image, for pixels
    closer than `feathering` to a padded side, ((feathering - d) / feathering)^2, else 0.

    ComfyUI loops over every pixel; the same numbers come from distances to each padded side
    (an unpadded side counts as far away), computed in float64 and stored as float32 like its
    Python floats.
    """
    mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
    inner = torch.zeros((height, width), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
        rows = torch.arange(height, dtype=torch.float64)[:, None]
        cols = torch.arange(width, dtype=torch.float64)[None, :]
        far_rows, far_cols = torch.full_like(rows, height), torch.full_like(cols, width)
        d_top = rows if top != 0 else far_rows
        d_bottom = height - rows if bottom != 0 else far_rows
        d_left = cols if left != 0 else far_cols
        d_right = width - cols if right != 0 else far_cols
        d = torch.minimum(torch.minimum(d_top, d_bottom), torch.minimum(d_left, d_right))
        v = (feathering - d) / feathering
        inner = torch.where(d < feathering, v * v, torch.zeros_like(v)).to(torch.float32)
    mask[top : top + height, left : left + width] = inner
    return mask


class ImagePadForOutpaint(Node):
    """Pad images with grey (0.5) on each side and return a mask of the new area, feathered inwards."""

    DISPLAY_NAME = "Pad Image for Outpainting"
    CATEGORY = "image"
    INPUTS = (
        Socket("image", IMAGE),
        Int("left", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("top", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("right", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("bottom", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("feathering", 40, min=0, max=MAX_RESOLUTION, step=1),
    )
    # feathering shapes the mask only
    OUTPUTS = (Output(IMAGE, depends_on=("image", "left", "top", "right", "bottom")), Output(MASK))

    def run(
        self,
        ctx: RunContext,
        image: torch.Tensor,
        left: int,
        top: int,
        right: int,
        bottom: int,
        feathering: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected an IMAGE [batch, height, width, channels], got {shape}")
        batch, height, width, channels = image.shape
        padded = torch.ones((batch, height + top + bottom, width + left + right, channels)) * 0.5
        padded[:, top : top + height, left : left + width, :] = image
        mask = outpaint_mask(height, width, left, top, right, bottom, feathering)
        return padded, mask.unsqueeze(0)


NODES: tuple[type[Node], ...] = (ImagePadForOutpaint,)
