"""Every node nodegraph offers, listed explicitly (each module below exports `NODES`), and the entry
API the composition root uses (`nodegraph.cli`: run, serve, demo, lora-info, train-lora).

The CLI reaches `nodes` through this module only (`tests/engine/test_layers.py` allows exactly
that arrow); each function imports its torch-side module when called, never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.node import Node


def all_nodes() -> list[type[Node]]:
    """The node classes, in the order the canvas lists them."""
    from nodes import (
        clip_vision,
        component_loaders,
        conditioning,
        conditioning_area,
        conditioning_combine,
        conditioning_sdxl,
        controlnet,
        custom_sampling,
        gligen,
        guidance_patches,
        hypernetwork,
        image,
        image_alpha,
        image_batch,
        image_filters,
        image_morphology,
        image_stitch,
        image_transform,
        inpaint,
        latent,
        latent_batch,
        latent_math,
        latent_transform,
        loaders,
        lora,
        lora_stacks,
        mask,
        merge,
        merge_blocks,
        model_advanced,
        model_patches,
        model_save,
        outpaint,
        preprocessors,
        rebatch,
        sampling,
        sigmas,
        train_node,
        upscale_model,
        vae_tiled,
    )

    modules = (
        loaders,
        component_loaders,
        lora,
        lora_stacks,
        hypernetwork,
        merge,
        merge_blocks,
        model_save,
        conditioning,
        conditioning_combine,
        conditioning_sdxl,
        conditioning_area,
        controlnet,
        clip_vision,
        gligen,
        sampling,
        custom_sampling,
        sigmas,
        model_advanced,
        model_patches,
        guidance_patches,
        latent,
        latent_transform,
        latent_batch,
        latent_math,
        inpaint,
        image,
        vae_tiled,
        image_transform,
        image_filters,
        image_morphology,
        image_stitch,
        image_batch,
        rebatch,
        image_alpha,
        mask,
        outpaint,
        preprocessors,
        upscale_model,
        train_node,
    )
    return [cls for module in modules for cls in module.NODES]


def register_services(env: Environment) -> None:
    """Register the node layer's services for the server and the CLI (`nodegraph.services`)."""
    from nodegraph.services import CheckpointCatalog, DeviceInfo, LoraCatalog
    from nodes.catalogs import FolderCheckpointCatalog, FolderLoraCatalog
    from nodes.device_info import TorchDeviceInfo

    env.services[LoraCatalog] = FolderLoraCatalog(env)
    env.services[CheckpointCatalog] = FolderCheckpointCatalog(env)
    env.services[DeviceInfo] = TorchDeviceInfo(env.device)


def warm_up() -> None:
    """Import the model libraries now (seconds of work), so the first prompt does not pay for it
    inside the server's worker thread while holding the GIL."""
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from nodes.sd import checkpoint, convert  # noqa: F401


def device_problem(device: str, precision: str) -> str | None:
    """Why this device and precision cannot be had here (a startup error), or None."""
    from nodes.sd.device import DeviceError, make_placement

    try:
        make_placement(device, precision)
    except DeviceError as exc:
        return str(exc)
    return None


def write_demo_models(folders: Folders, force: bool = False, sdxl: bool = False) -> list[Path]:
    """Write the small demo checkpoint, LoRAs and input image into the models folders (`sdxl`:
    the SDXL-family demo checkpoint, refiner and LoRA as well)."""
    from nodes.demo import write_demo_models as write

    return write(folders, force=force, sdxl=sdxl)


def describe_lora_files(files: Sequence[str], folders: Folders, as_json: bool) -> int:
    """`nodegraph lora-info`: describe LoRA files; returns the exit status.

    Not named `lora_info`: that is the submodule `nodes.lora_info`, which a package attribute of the
    same name would hide from `from nodes import lora_info` (the canvas's LoRA routes use it)."""
    from nodes.lora_info import main

    return int(main(files, folders, as_json))


def training() -> tuple[ModuleType, ModuleType]:
    """The LoRA trainer's modules (`nodes.train.run`, `nodes.train.request`) for `nodegraph train-lora`."""
    from nodes.train import request, run

    return run, request
