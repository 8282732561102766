"""Image alpha nodes: SplitImageWithAlpha, JoinImageWithAlpha, PorterDuffImageComposite
(comfy_extras/nodes_compositing.py: ids, inputs and formulas).

ComfyUI's alpha travels as a MASK that is 1 − alpha (LoadImage's convention: 1 where transparent);
the nodes convert on the way in and out, as ComfyUI does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from nodegraph.node import Combo, Node, Output, RunContext, Socket
from nodegraph.types import IMAGE, MASK
from nodes.mask import batched
from nodes.sd.latent_ops import common_upscale, repeat_to_batch_size

MODES = (
    "ADD",
    "CLEAR",
    "DARKEN",
    "DST",
    "DST_ATOP",
    "DST_IN",
    "DST_OUT",
    "DST_OVER",
    "LIGHTEN",
    "MULTIPLY",
    "OVERLAY",
    "SCREEN",
    "SRC",
    "SRC_ATOP",
    "SRC_IN",
    "SRC_OUT",
    "SRC_OVER",
    "XOR",
)


def _image(node: str, name: str, image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"{node}: input {name} is not an image batch [B, H, W, C]")
    return image


Pair = tuple[torch.Tensor, torch.Tensor]


def _over(sa: torch.Tensor, da: torch.Tensor, si: torch.Tensor, di: torch.Tensor, mode: str) -> Pair:
    """One mode's (alpha, premultiplied colour) from premultiplied source and destination."""
    union = sa + da - sa * da
    table: dict[str, Callable[[], Pair]] = {
        "ADD": lambda: (torch.clamp(sa + da, 0, 1), torch.clamp(si + di, 0, 1)),
        "CLEAR": lambda: (torch.zeros_like(da), torch.zeros_like(di)),
        "DARKEN": lambda: (union, (1 - da) * si + (1 - sa) * di + torch.min(si, di)),
        "DST": lambda: (da, di),
        "DST_ATOP": lambda: (sa, sa * di + (1 - da) * si),
        "DST_IN": lambda: (sa * da, di * sa),
        "DST_OUT": lambda: ((1 - sa) * da, (1 - sa) * di),
        "DST_OVER": lambda: (da + (1 - da) * sa, di + (1 - da) * si),
        "LIGHTEN": lambda: (union, (1 - da) * si + (1 - sa) * di + torch.max(si, di)),
        "MULTIPLY": lambda: (sa * da, si * di),
        "OVERLAY": lambda: (
            union,
            torch.where(2 * di < da, 2 * si * di, sa * da - 2 * (da - si) * (sa - di)),
        ),
        "SCREEN": lambda: (union, si + di - si * di),
        "SRC": lambda: (sa, si),
        "SRC_ATOP": lambda: (da, da * si + (1 - sa) * di),
        "SRC_IN": lambda: (sa * da, si * da),
        "SRC_OUT": lambda: ((1 - da) * sa, (1 - da) * si),
        "SRC_OVER": lambda: (sa + (1 - sa) * da, si + (1 - sa) * di),
        "XOR": lambda: ((1 - da) * sa + (1 - sa) * da, (1 - da) * si + (1 - sa) * di),
    }
    return table[mode]()


def porter_duff(
    src: torch.Tensor, src_mask: torch.Tensor, dst: torch.Tensor, dst_mask: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's porter_duff_composite on one `[H, W, C]` image pair with `[H, W, 1]` masks (1 − alpha)."""
    sa, da = 1 - src_mask, 1 - dst_mask
    alpha, colour = _over(sa, da, src * sa, dst * da, mode)
    colour = torch.where(alpha > 1e-5, colour / alpha, torch.zeros_like(colour))
    return torch.clamp(colour, 0, 1), 1 - alpha


def _fit(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An `[H, W, C]` tensor resized to height x width (bicubic, centre crop: common_upscale)."""
    resized = common_upscale(t.unsqueeze(0).permute(0, 3, 1, 2), width, height, "bicubic", "center")
    return resized.permute(0, 2, 3, 1).squeeze(0)


class PorterDuffImageComposite(Node):
    """Composite two images with their alpha masks by one of the Porter-Duff operators."""

    DISPLAY_NAME = "Porter-Duff Image Composite"
    CATEGORY = "mask/compositing"
    INPUTS = (
        Socket("source", IMAGE),
        Socket("source_alpha", MASK),
        Socket("destination", IMAGE),
        Socket("destination_alpha", MASK),
        Combo("mode", choices=MODES, default="DST"),
    )
    OUTPUTS = (Output(IMAGE), Output(MASK))

    def run(
        self,
        ctx: RunContext,
        source: torch.Tensor,
        source_alpha: torch.Tensor,
        destination: torch.Tensor,
        destination_alpha: torch.Tensor,
        mode: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        node = "PorterDuffImageComposite"
        source, destination = _image(node, "source", source), _image(node, "destination", destination)
        src_masks, dst_masks = batched(source_alpha), batched(destination_alpha)
        if source.shape[-1] != destination.shape[-1]:
            raise ValueError(
                f"{node}: source has {source.shape[-1]} channels and destination {destination.shape[-1]}; "
                "give both RGB (or both RGBA) images"
            )
        images, masks = [], []
        for i in range(min(len(source), len(src_masks), len(destination), len(dst_masks))):
            src, dst = source[i], destination[i]
            sa, da = src_masks[i].unsqueeze(2), dst_masks[i].unsqueeze(2)
            if da.shape[:2] != dst.shape[:2]:
                da = _fit(da, dst.shape[0], dst.shape[1])
            if src.shape != dst.shape:
                src = _fit(src, dst.shape[0], dst.shape[1])
            if sa.shape != da.shape:
                sa = _fit(sa, da.shape[0], da.shape[1])
            image, mask = porter_duff(src, sa, dst, da, mode)
            images.append(image)
            masks.append(mask.squeeze(2))
        return torch.stack(images), torch.stack(masks)


class SplitImageWithAlpha(Node):
    """Split an RGBA image into its RGB image and a mask (1 − alpha; all zero without alpha)."""

    DISPLAY_NAME = "Split Image with Alpha"
    CATEGORY = "mask/compositing"
    INPUTS = (Socket("image", IMAGE),)
    OUTPUTS = (Output(IMAGE), Output(MASK))

    def run(self, ctx: RunContext, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = _image("SplitImageWithAlpha", "image", image)
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return image[..., :3].clone(), 1.0 - alpha


class JoinImageWithAlpha(Node):
    """Give an image an alpha channel from a mask (alpha = 1 − mask, resized to the image)."""

    DISPLAY_NAME = "Join Image with Alpha"
    CATEGORY = "mask/compositing"
    INPUTS = (Socket("image", IMAGE), Socket("alpha", MASK))
    OUTPUTS = (Output(IMAGE),)

    def run(self, ctx: RunContext, image: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor]:
        image, masks = _image("JoinImageWithAlpha", "image", image), batched(alpha)
        batch = max(len(image), len(masks))
        image, masks = repeat_to_batch_size(image, batch), repeat_to_batch_size(masks, batch)
        size = (image.shape[1], image.shape[2])
        resized = F.interpolate(
            masks.reshape((-1, 1, *masks.shape[-2:])), size=size, mode="bilinear"
        ).squeeze(1)
        return (torch.cat((image[..., :3], (1.0 - resized).unsqueeze(-1)), dim=-1),)


NODES: tuple[type[Node], ...] = (PorterDuffImageComposite, SplitImageWithAlpha, JoinImageWithAlpha)
