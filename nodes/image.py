"""Nodes: VAEDecode, VAEEncode, LoadImage, SaveImage, PreviewImage.

IMAGE values are float32 `[B, H, W, 3]` in [0, 1]; MASK values `[B, H, W]`; LATENT values
ComfyUI's dict `{"samples": [B, 4, h, w]}`. File naming, PNG metadata and the uint8 conversion
(truncation, not rounding) follow ComfyUI's `nodes.py` and `folder_paths.py` byte for byte.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin, UnidentifiedImageError

from nodegraph.env import Environment
from nodegraph.file_inputs import annotated_path
from nodegraph.folders import PathEscapeError
from nodegraph.images import ImageBudgetError, open_checked
from nodegraph.node import Hidden, ImageUpload, Node, Output, Result, RunContext, Socket, String
from nodegraph.types import IMAGE, LATENT, MASK, VAE
from nodes.sd import vae as vae_math
from nodes.sd.device import on_device
from nodes.sd.handles import VaeHandle
from nodes.sd.values import Latent

PREVIEW_CHARS = "abcdefghijklmnopqrstupvxyz"  # sic: ComfyUI's literal string (no "w", two "p")


class ImageFileError(ValueError):
    """An input image cannot be read; the message names the file."""


@contextmanager
def reading_image(name: str) -> Iterator[None]:
    """Turn what reading the image file `name` can raise (over the pixel budget, not an image, a
    broken file) into an `ImageFileError` that names it."""
    try:
        yield
    except ImageBudgetError as exc:
        raise ImageFileError(str(exc)) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageFileError(
            f"'{name}' is not an image that can be read ({exc}); pick a PNG, JPEG or WebP file"
        ) from exc


def preview_prefix() -> str:
    """A preview's file prefix in the temp folder: ComfyUI's `ComfyUI_temp_` and five random letters."""
    return "ComfyUI_temp_" + "".join(random.choice(PREVIEW_CHARS) for _ in range(5))


class VAEDecode(Node):
    """Decodes latent images back into pixel space images."""

    DISPLAY_NAME = "VAE Decode"
    CATEGORY = "latent"
    INPUTS = (
        Socket("samples", socket_type=LATENT, tooltip="The latent to be decoded."),
        Socket("vae", socket_type=VAE, tooltip="The VAE model used for decoding the latent."),
    )
    OUTPUTS = (Output(IMAGE, tooltip="The decoded image."),)

    def run(self, ctx: RunContext, samples: Latent, vae: VaeHandle) -> tuple[torch.Tensor]:
        return (vae_math.decode(on_device(ctx.env, vae.vae, "vae"), samples["samples"]),)


class VAEEncode(Node):
    """Encode images into latents with a VAE (the posterior mean, not a sample)."""

    DISPLAY_NAME = "VAE Encode"
    CATEGORY = "latent"
    INPUTS = (Socket("pixels", socket_type=IMAGE), Socket("vae", socket_type=VAE))
    OUTPUTS = (Output(LATENT),)

    def run(self, ctx: RunContext, pixels: torch.Tensor, vae: VaeHandle) -> tuple[Latent]:
        return ({"samples": vae_math.encode(on_device(ctx.env, vae.vae, "vae"), pixels)},)


# --------------------------------------------------------------------------------------------
# Loading


class LoadImage(Node):
    """Load an image from the input folder; the mask is 1 where the image is transparent."""

    DISPLAY_NAME = "Load Image"
    CATEGORY = "image"
    INPUTS = (ImageUpload("image"),)
    OUTPUTS = (Output(IMAGE), Output(MASK))

    def run(self, ctx: RunContext, image: str) -> tuple[torch.Tensor, torch.Tensor]:
        return load_image_file(annotated_path(ctx.env, image), image)


def load_image_file(path: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(IMAGE `[F, H, W, 3]`, MASK `[F, H, W]` or `[1, 64, 64]` zeros) from every frame of the same size."""
    with reading_image(name):
        img = open_checked(path, name)
        frames = [_frame(ImageOps.exif_transpose(f) or f) for f in ImageSequence.Iterator(img)]
    size = frames[0][0].shape[:2]
    kept = [(i, m) for i, m in frames if i.shape[:2] == size]
    if len(kept) > 1 and img.format != "MPO":
        return torch.stack([i for i, _ in kept]), torch.stack([m for _, m in kept])
    return kept[0][0][None], kept[0][1][None]


def _frame(frame: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    if frame.mode == "I":
        frame = frame.point(lambda v: v * (1 / 255))
    rgb = torch.from_numpy(np.array(frame.convert("RGB")).astype(np.float32) / 255.0)
    if "A" in frame.getbands():
        alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
        mask = 1.0 - torch.from_numpy(alpha)
    elif frame.mode == "P" and "transparency" in frame.info:
        alpha = np.array(frame.convert("RGBA").getchannel("A")).astype(np.float32) / 255.0
        mask = 1.0 - torch.from_numpy(alpha)
    else:
        mask = torch.zeros((64, 64), dtype=torch.float32)
    return rgb, mask


# --------------------------------------------------------------------------------------------
# Saving


def save_path(prefix: str, output_dir: Path, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file stem, first counter, subfolder): ComfyUI's `get_save_image_path`.

    A backslash separates folders as on Windows: kept in a file name, `..\\x_00001_.png` was saved
    but never servable (`/view` refuses backslashes), and `..\\` must meet the escape check.
    """
    prefix = prefix.replace("\\", "/")
    if "%" in prefix:
        now = time.localtime()
        for token, value in (
            ("%width%", str(width)),
            ("%height%", str(height)),
            ("%year%", str(now.tm_year)),
            ("%month%", f"{now.tm_mon:02}"),
            ("%day%", f"{now.tm_mday:02}"),
            ("%hour%", f"{now.tm_hour:02}"),
            ("%minute%", f"{now.tm_min:02}"),
            ("%second%", f"{now.tm_sec:02}"),
        ):
            prefix = prefix.replace(token, value)
    normal = os.path.normpath(prefix)
    subfolder, stem = os.path.dirname(normal), os.path.basename(normal)
    base = os.path.realpath(output_dir)
    folder = os.path.realpath(os.path.join(base, subfolder))
    if os.path.isabs(subfolder) or os.path.commonpath((base, folder)) != base or not stem:
        raise PathEscapeError(
            f"filename_prefix '{prefix}' would save outside the output folder {output_dir};"
            " use a relative prefix"
        )
    os.makedirs(folder, exist_ok=True)
    return Path(folder), stem, _next_counter(Path(folder), stem), subfolder


def _next_counter(folder: Path, stem: str) -> int:
    """1 + the largest counter among files `<stem>_<digits>_...` (case-insensitive stem match)."""
    best = 0
    for name in os.listdir(folder):
        head, rest = name[: len(stem) + 1], name[len(stem) + 1 :]
        if os.path.normcase(head[:-1]) != os.path.normcase(stem) or head[-1:] != "_":
            continue
        try:
            best = max(best, int(rest.split("_")[0]))
        except ValueError:
            continue
    return best + 1


def _link_or_copy(tmp: str, target: Path, data: bytes) -> None:
    """Hard-link `tmp` to `target`; where links are not supported, create `target` exclusively."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FAT file systems)
        with open(target, "xb") as out:
            out.write(data)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """ComfyUI's conversion: `clip(255·x, 0, 255).astype(uint8)` (truncates)."""
    return np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)


def png_metadata(env: Environment, prompt: Any, extra_pnginfo: Any) -> PngImagePlugin.PngInfo | None:
    """tEXt chunks: `prompt` and each extra_pnginfo key (json.dumps), unless metadata is disabled."""
    if env.disable_metadata:
        return None
    info = PngImagePlugin.PngInfo()
    if prompt is not None:
        info.add_text("prompt", json.dumps(prompt))
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            info.add_text(key, json.dumps(value))
    return info


def save_images(
    env: Environment, images: torch.Tensor, prefix: str, kind: str, compress: int, prompt: Any, extra: Any
) -> list[dict[str, str]]:
    """Write each image as `<stem>_<counter:05>_.png` and return the ui entries."""
    folder, stem, counter, subfolder = save_path(
        prefix, env.folders.data_dir(kind), images.shape[2], images.shape[1]
    )
    info = png_metadata(env, prompt, extra)
    results = []
    for batch_number, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buffer, format="PNG", pnginfo=info, compress_level=compress)
        stem_n = stem.replace("%batch_num%", str(batch_number))
        name, counter = _write_new(folder, stem_n, counter, buffer.getvalue())
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


def _write_new(folder: Path, stem: str, counter: int, data: bytes) -> tuple[str, int]:
    """Write `<stem>_<counter:05>_.png` whole under a name no other writer holds; (name, counter used).

    The file is written aside and linked into place: the link fails if the name exists, so two
    processes saving the same prefix at once (two Ray workers on one machine) take the next counter
    instead of overwriting each other, and a crash never leaves a half-written PNG under the name.
    """
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".png.partial", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; a saved image is readable by others, as before
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        for _ in range(10_000):
            name = f"{stem}_{counter:05}_.png"
            try:
                _link_or_copy(tmp, folder / name, data)
                return name, counter
            except FileExistsError:
                counter += 1
        raise FileExistsError(f"no free file name for {stem!r} in {folder}")
    finally:
        os.unlink(tmp)


class SaveImage(Node):
    """Saves the input images to your ComfyUI output directory."""

    DISPLAY_NAME = "Save Image"
    CATEGORY = "image"
    OUTPUT_NODE = True
    INPUTS = (
        Socket("images", socket_type=IMAGE, tooltip="The images to save."),
        String(
            "filename_prefix",
            "ComfyUI",
            tooltip="The prefix for the file to save. This may include formatting information such as "
            "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.",
        ),
        Hidden("prompt", kind="PROMPT"),
        Hidden("extra_pnginfo", kind="EXTRA_PNGINFO"),
    )
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        images: torch.Tensor,
        filename_prefix: str = "ComfyUI",
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        saved = save_images(ctx.env, images, filename_prefix, "output", 4, prompt, extra_pnginfo)
        return Result(ui={"images": saved})


class PreviewImage(Node):
    """Saves the input images to your ComfyUI output directory."""

    DISPLAY_NAME = "Preview Image"
    CATEGORY = "image"
    OUTPUT_NODE = True
    INPUTS = (
        Socket("images", socket_type=IMAGE),
        Hidden("prompt", kind="PROMPT"),
        Hidden("extra_pnginfo", kind="EXTRA_PNGINFO"),
    )
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        images: torch.Tensor,
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        saved = save_images(ctx.env, images, preview_prefix(), "temp", 1, prompt, extra_pnginfo)
        return Result(ui={"images": saved})


NODES: tuple[type[Node], ...] = (VAEDecode, VAEEncode, LoadImage, SaveImage, PreviewImage)
