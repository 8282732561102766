"""Nodes: CLIPTextEncodeSDXL and CLIPTextEncodeSDXLRefiner (ComfyUI comfy_extras/nodes_clip_sdxl.py).

Both return one entry `[cond, {"pooled_output": ..., sizes...}]`; the sampler turns the pooled
output and the size (and, for the refiner, aesthetic-score) values into the UNet's added
conditioning `y` (nodes/sd/adm.py). `CLIPTextEncode` on an SDXL CLIP sets no sizes: the sampler
then uses the latent's size (ComfyUI's `encode_model_conds`).
"""

from __future__ import annotations

from nodegraph.node import MAX_RESOLUTION, Float, Int, Node, Output, RunContext, Socket, String
from nodegraph.types import CLIP, CONDITIONING
from nodes.conditioning import encode_sdxl_entry
from nodes.sd.handles import ClipHandle
from nodes.sd.values import Conditioning, CondOptions


def _need_sdxl(clip: ClipHandle | None, node: str) -> ClipHandle:
    if clip is None or clip.text_encoder_2 is None:
        what = "no CLIP" if clip is None else f"the CLIP of '{clip.source}' ({clip.family})"
        raise ValueError(f"{node} needs an SDXL CLIP (OpenCLIP bigG); it got {what}. Use CLIPTextEncode")
    return clip


class CLIPTextEncodeSDXL(Node):
    """Encode text for SDXL: text_g for OpenCLIP bigG, text_l for CLIP-L, plus the size conditioning."""

    DISPLAY_NAME = "CLIPTextEncodeSDXL"
    CATEGORY = "advanced/conditioning"
    INPUTS = (
        Socket("clip", socket_type=CLIP),
        Int("width", 1024, min=0, max=MAX_RESOLUTION),
        Int("height", 1024, min=0, max=MAX_RESOLUTION),
        Int("crop_w", 0, min=0, max=MAX_RESOLUTION),
        Int("crop_h", 0, min=0, max=MAX_RESOLUTION),
        Int("target_width", 1024, min=0, max=MAX_RESOLUTION),
        Int("target_height", 1024, min=0, max=MAX_RESOLUTION),
        String("text_g", multiline=True, dynamic_prompts=True),
        String("text_l", multiline=True, dynamic_prompts=True),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        clip: ClipHandle,
        width: int,
        height: int,
        crop_w: int,
        crop_h: int,
        target_width: int,
        target_height: int,
        text_g: str,
        text_l: str,
    ) -> tuple[Conditioning]:
        clip = _need_sdxl(clip, "CLIPTextEncodeSDXL")
        if clip.text_encoder is None:
            raise ValueError(
                f"CLIPTextEncodeSDXL needs an SDXL base CLIP (CLIP-L and bigG); '{clip.source}' is an SDXL "
                "refiner (bigG only): use CLIPTextEncodeSDXLRefiner with it"
            )
        sizes: CondOptions = {
            "width": width,
            "height": height,
            "crop_w": crop_w,
            "crop_h": crop_h,
            "target_width": target_width,
            "target_height": target_height,
        }
        return ([encode_sdxl_entry(ctx, clip, text_g, text_l, sizes)],)


class CLIPTextEncodeSDXLRefiner(Node):
    """Encode text for the SDXL refiner: bigG's conditioning plus aesthetic score and size."""

    DISPLAY_NAME = "CLIPTextEncodeSDXLRefiner"
    CATEGORY = "advanced/conditioning"
    INPUTS = (
        Float("ascore", 6.0, min=0.0, max=1000.0, step=0.01),
        Int("width", 1024, min=0, max=MAX_RESOLUTION),
        Int("height", 1024, min=0, max=MAX_RESOLUTION),
        String("text", multiline=True, dynamic_prompts=True),
        Socket("clip", socket_type=CLIP),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self, ctx: RunContext, ascore: float, width: int, height: int, text: str, clip: ClipHandle
    ) -> tuple[Conditioning]:
        clip = _need_sdxl(clip, "CLIPTextEncodeSDXLRefiner")
        options: CondOptions = {"aesthetic_score": ascore, "width": width, "height": height}
        return ([encode_sdxl_entry(ctx, clip, text, None, options)],)


NODES: tuple[type[Node], ...] = (CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner)
