"""Nodes: UNETLoader ("Load Diffusion Model"), CLIPLoader and DualCLIPLoader: a model's parts from
separate files, with ComfyUI's ids, inputs and folders (`diffusion_models` = models/unet +
models/diffusion_models, `text_encoders` = models/text_encoders + models/clip).

Loading goes through the model store, as for checkpoints: a file loaded the same way by several
nodes or workflows is read once, and the store's bound counts it. The file formats and what each
type makes are in `nodes.sd.unet_file` and `nodes.sd.clip_file`.
"""

from __future__ import annotations

from nodegraph.env import Environment
from nodegraph.node import Combo, FileChoice, Node, Output, RunContext
from nodegraph.types import CLIP, MODEL
from nodes.loaders import clip_handle, model_store
from nodes.sd.checkpoint import CheckpointError
from nodes.sd.clip_file import CLIP_TYPES, DUAL_CLIP_TYPES, LoadedClip, check_clip_type, load_clip_files
from nodes.sd.handles import ClipHandle, ModelHandle
from nodes.sd.unet_file import WEIGHT_DTYPES, LoadedUnet, load_unet_file

CLIP_DEVICES = ("default", "cpu")


class UNETLoader(Node):
    """Load a diffusion model (UNet) file on its own: SD1.x or SDXL, LDM or diffusers layout.

    weight_dtype fp8_*: the weights are rounded to that 8-bit float format once, at load (ComfyUI's
    fp8 storage computes with the same values).
    """

    DISPLAY_NAME = "Load Diffusion Model"
    CATEGORY = "advanced/loaders"
    INPUTS = (
        FileChoice("unet_name", folder="diffusion_models"),
        Combo("weight_dtype", choices=WEIGHT_DTYPES),
    )
    OUTPUTS = (Output(MODEL),)

    def run(self, ctx: RunContext, unet_name: str, weight_dtype: str) -> tuple[ModelHandle]:
        path = ctx.env.folders.resolve("diffusion_models", unet_name)
        loaded: LoadedUnet = model_store(ctx.env).load(
            f"unet:{weight_dtype}", (path,), lambda: load_unet_file(path, weight_dtype)
        )
        handle = ModelHandle(
            unet=loaded.unet,
            source=unet_name,
            family=loaded.family,
            sampling=loaded.sampling,
            base_sampling=loaded.sampling,
        )
        return (handle,)


def _load_clip(ctx: RunContext, names: tuple[str, ...], clip_type: str, device: str) -> ClipHandle:
    check_clip_type(clip_type, len(names))
    paths = tuple(ctx.env.folders.resolve("text_encoders", name) for name in names)
    loaded: LoadedClip = model_store(ctx.env).load(
        f"clip:{clip_type}:{device}", paths, lambda: load_clip_files(paths, clip_type)
    )
    extra = {"device": device} if device != "default" else None
    source = " + ".join(names)
    return clip_handle(ctx.env, source, loaded.family, loaded.text_encoder, loaded.text_encoder_2, extra)


class CLIPLoader(Node):
    """Load a text encoder file on its own (stable_diffusion: CLIP-L for SD1.x, bigG for the SDXL refiner).

    [Recipes] stable_diffusion: clip-l (SD1.x), or clip-g alone (the SDXL refiner's). The other types
    are for model families nodegraph does not run and are refused.
    """

    DISPLAY_NAME = "Load CLIP"
    CATEGORY = "advanced/loaders"
    INPUTS = (
        FileChoice("clip_name", folder="text_encoders"),
        Combo("type", choices=CLIP_TYPES),
        Combo("device", choices=CLIP_DEVICES, optional=True, advanced=True),
    )
    OUTPUTS = (Output(CLIP),)

    @classmethod
    def check_inputs(cls, env: Environment, /, *args: object, **constants: object) -> str | None:
        return _type_problem(constants.get("type"), 1)

    def run(self, ctx: RunContext, clip_name: str, type: str, device: str = "default") -> tuple[ClipHandle]:
        return (_load_clip(ctx, (clip_name,), type, device),)


class DualCLIPLoader(Node):
    """Load two text encoder files as one CLIP (type sdxl: a CLIP-L and an OpenCLIP bigG, in either order).

    [Recipes] sdxl: clip-l, clip-g. The other types are for model families nodegraph does not run
    and are refused.
    """

    CATEGORY = "advanced/loaders"
    INPUTS = (
        FileChoice("clip_name1", folder="text_encoders"),
        FileChoice("clip_name2", folder="text_encoders"),
        Combo("type", choices=DUAL_CLIP_TYPES),
        Combo("device", choices=CLIP_DEVICES, optional=True, advanced=True),
    )
    OUTPUTS = (Output(CLIP),)

    @classmethod
    def check_inputs(cls, env: Environment, /, *args: object, **constants: object) -> str | None:
        return _type_problem(constants.get("type"), 2)

    def run(
        self,
        ctx: RunContext,
        clip_name1: str,
        clip_name2: str,
        type: str,
        device: str = "default",
    ) -> tuple[ClipHandle]:
        return (_load_clip(ctx, (clip_name1, clip_name2), type, device),)


def _type_problem(clip_type: object, count: int) -> str | None:
    """At validation: a type for another model family is refused before anything is loaded."""
    if not isinstance(clip_type, str):
        return None  # a linked or missing value: checked when the node runs
    try:
        check_clip_type(clip_type, count)
    except CheckpointError as exc:
        return str(exc)
    return None


NODES: tuple[type[Node], ...] = (UNETLoader, CLIPLoader, DualCLIPLoader)
