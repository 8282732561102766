"""Nodes: EmptyLatentImage, LatentUpscale, SaveLatent, LoadLatent (ComfyUI's ids, inputs and files).

A LATENT value is a dict `{"samples": float32 [B,4,h,w]}` in VAE space (not x 0.18215), with
optional "noise_mask" and "batch_index"; nodes return new dicts and never modify their inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from nodegraph.env import Environment
from nodegraph.folders import PathEscapeError, safe_join
from nodegraph.node import (
    MAX_RESOLUTION,
    Combo,
    Hidden,
    Int,
    Node,
    Output,
    Result,
    RunContext,
    Socket,
    String,
)
from nodegraph.types import LATENT
from nodes.sd.latent_ops import (
    CROP_METHODS,
    UPSCALE_METHODS,
    common_upscale,
    load_latent_file,
    save_latent_file,
)
from nodes.sd.values import Latent


class EmptyLatentImage(Node):
    """Create a new batch of empty latent images to be denoised via sampling."""

    DISPLAY_NAME = "Empty Latent Image"
    CATEGORY = "latent"
    INPUTS = (
        Int(
            "width",
            512,
            min=16,
            max=MAX_RESOLUTION,
            step=8,
            tooltip="The width of the latent images in pixels.",
        ),
        Int(
            "height",
            512,
            min=16,
            max=MAX_RESOLUTION,
            step=8,
            tooltip="The height of the latent images in pixels.",
        ),
        Int("batch_size", 1, min=1, max=4096, tooltip="The number of latent images in the batch."),
    )
    OUTPUTS = (Output(LATENT, tooltip="The empty latent image batch."),)

    def run(self, ctx: RunContext, width: int, height: int, batch_size: int) -> tuple[Latent]:
        return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


class LatentUpscale(Node):
    """Resize a latent image to a width and height in pixels."""

    DISPLAY_NAME = "Upscale Latent"
    CATEGORY = "latent"
    INPUTS = (
        Socket("samples", LATENT),
        Combo("upscale_method", choices=UPSCALE_METHODS),
        Int("width", 512, min=0, max=MAX_RESOLUTION, step=8),
        Int("height", 512, min=0, max=MAX_RESOLUTION, step=8),
        Combo("crop", choices=CROP_METHODS),
    )
    OUTPUTS = (Output(LATENT),)

    def run(
        self,
        ctx: RunContext,
        samples: Latent,
        upscale_method: str,
        width: int,
        height: int,
        crop: str,
    ) -> tuple[Latent]:
        if width == 0 and height == 0:
            return (samples,)
        t: torch.Tensor = samples["samples"]
        # a zero side follows the aspect ratio; each side is at least 64 pixels
        if width == 0:
            height = max(64, height)
            width = max(64, round(t.shape[-1] * height / t.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(t.shape[-2] * width / t.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        out = samples.copy()
        out["samples"] = common_upscale(t, width // 8, height // 8, upscale_method, crop)
        return (out,)


def save_path(output_dir: Path, filename_prefix: str) -> tuple[Path, str, int, str]:
    """ComfyUI's get_save_image_path: (folder, file stem, next counter, subfolder) inside output_dir."""
    normalised = os.path.normpath(filename_prefix)
    subfolder, stem = os.path.dirname(normalised), os.path.basename(normalised)
    folder = safe_join(output_dir, subfolder) if subfolder else output_dir
    folder.mkdir(parents=True, exist_ok=True)
    counter = 0
    for name in os.listdir(folder):
        head, sep, rest = name[len(stem) :].partition("_")
        if name[: len(stem)].lower() == stem.lower() and head == "" and sep:
            digits = rest.split("_")[0]
            if digits.isdigit():
                counter = max(counter, int(digits))
    return folder, stem, counter + 1, subfolder.replace(os.sep, "/")


class SaveLatent(Node):
    """Save latents to the output folder as ComfyUI `.latent` files (with the prompt as metadata)."""

    DISPLAY_NAME = "SaveLatent"
    CATEGORY = "_for_testing"
    OUTPUT_NODE = True
    INPUTS = (
        Socket("samples", LATENT),
        String("filename_prefix", "latents/ComfyUI"),
        Hidden("prompt", kind="PROMPT"),
        Hidden("extra_pnginfo", kind="EXTRA_PNGINFO"),
    )
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        samples: Latent,
        filename_prefix: str,
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        try:
            folder, stem, counter, subfolder = save_path(ctx.env.folders.output_dir, filename_prefix)
        except PathEscapeError as exc:
            raise ValueError(
                f"SaveLatent: filename_prefix {filename_prefix!r} points outside the output folder; "
                "use a relative name such as 'latents/ComfyUI'"
            ) from exc
        metadata: dict[str, Any] | None = None
        if not ctx.env.disable_metadata:
            metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
            for key, value in (extra_pnginfo or {}).items():
                metadata[key] = json.dumps(value)
        name = f"{stem}_{counter:05}_.latent"
        save_latent_file(folder / name, samples["samples"], metadata)
        return Result((), {"latents": [{"filename": name, "subfolder": subfolder, "type": "output"}]})


def latent_files(env: Environment) -> Sequence[str]:
    """The `.latent` files at the top of the input folder (LoadLatent's choices)."""
    folder = env.folders.input_dir
    if not folder.is_dir():
        return []
    return sorted(f.name for f in folder.iterdir() if f.is_file() and f.name.endswith(".latent"))


def _latent_path(env: Environment, latent: str) -> Path:
    folder, name = env.folders.annotated(latent)
    return safe_join(folder, name)


class LoadLatent(Node):
    """Load a `.latent` file from the input folder."""

    DISPLAY_NAME = "LoadLatent"
    CATEGORY = "_for_testing"
    INPUTS = (Combo("latent", choices=latent_files, check_membership=False),)
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, latent: str) -> tuple[Latent]:
        path = _latent_path(ctx.env, latent)
        try:
            return ({"samples": load_latent_file(path)},)
        except (OSError, ValueError) as exc:
            raise ValueError(f"LoadLatent: cannot read latent file {latent!r}: {exc}") from exc

    @classmethod
    def fingerprint(cls, env: Environment, **constants: Any) -> Hashable:
        try:
            return hashlib.sha256(_latent_path(env, str(constants.get("latent"))).read_bytes()).hexdigest()
        except (OSError, ValueError):
            return None

    @classmethod
    def check_inputs(cls, env: Environment, **constants: Any) -> str | None:
        try:
            if _latent_path(env, str(constants.get("latent"))).is_file():
                return None
        except (OSError, ValueError):
            pass
        return f"Invalid latent file: {constants.get('latent')}"


NODES: tuple[type[Node], ...] = (EmptyLatentImage, LatentUpscale, SaveLatent, LoadLatent)
