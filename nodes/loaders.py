"""Nodes: CheckpointLoaderSimple and VAELoader.

Loading goes through the model store (`nodes.sd.model_store`), so every loader node and every
workflow that names the same unchanged file shares one copy of its weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nodegraph.env import Environment
from nodegraph.node import FileChoice, Node, Output, RunContext
from nodegraph.types import CLIP, MODEL, VAE
from nodes.sd.checkpoint import LoadedCheckpoint, PixelSpaceVae, load_vae_file
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sd.model_sampling import EPS, checkpoint_sampling
from nodes.sd.model_store import ModelStore
from nodes.sd.tokenizer import default_tokenizer

PIXEL_SPACE = "pixel_space"


def diffusers_names(env: Environment) -> Sequence[str]:
    """Folders under the `diffusers` directories holding a `model_index.json` (ComfyUI's DiffusersLoader)."""
    found: set[str] = set()
    for top in env.folders.paths("diffusers"):
        if not top.is_dir():
            continue
        for root, _, files in os.walk(top, followlinks=True):
            if "model_index.json" in files:
                found.add(Path(root).relative_to(top).as_posix())
    return sorted(found)


def model_store(env: Environment) -> ModelStore:
    """The environment's one model store."""
    return env.service(ModelStore, ModelStore.create)


class CheckpointLoaderSimple(Node):
    """Loads a diffusion model checkpoint, diffusion models are used to denoise latents."""

    DISPLAY_NAME = "Load Checkpoint"
    CATEGORY = "loaders"
    INPUTS = (
        FileChoice("ckpt_name", folder="checkpoints", tooltip="The name of the checkpoint (model) to load."),
    )
    # The MODEL, CLIP and VAE of one file: each depends on that file (and its stamp) alone.
    OUTPUTS = (
        Output(MODEL, tooltip="The model used for denoising latents.", depends_on=("ckpt_name",)),
        Output(CLIP, tooltip="The CLIP model used for encoding text prompts.", depends_on=("ckpt_name",)),
        Output(
            VAE,
            tooltip="The VAE model used for encoding and decoding images to and from latent space.",
            depends_on=("ckpt_name",),
        ),
    )

    def run(self, ctx: RunContext, ckpt_name: str) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
        path = ctx.env.folders.resolve("checkpoints", ckpt_name)
        return _handles(ctx.env, model_store(ctx.env).checkpoint(path), ckpt_name)


def _handles(
    env: Environment, ckpt: LoadedCheckpoint, name: str
) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    # SDXL v-prediction checkpoints (NoobAI-XL v-pred ...) say so by marker keys and are sampled as such
    # without a node; ComfyUI reads the markers for the SDXL base class only (supported_models.SDXL).
    sampling = checkpoint_sampling(ckpt.path) if ckpt.family == "sdxl" else EPS
    model = ModelHandle(unet=ckpt.unet, source=name, family=ckpt.family, sampling=sampling)
    clip = ClipHandle(
        text_encoder=ckpt.text_encoder,
        tokenizer=default_tokenizer(),
        source=name,
        family=ckpt.family,
        embedding_dirs=tuple(env.folders.paths("embeddings")),
        text_encoder_2=ckpt.text_encoder_2,
    )
    vae = VaeHandle(vae=ckpt.vae, source=name, scaling_factor=ckpt.vae.config.scaling_factor)
    return model, clip, vae


class DiffusersLoader(Node):
    """Load an SD1.x diffusers pipeline folder (unet/, vae/, text_encoder/) from models/diffusers."""

    DISPLAY_NAME = "DiffusersLoader"
    CATEGORY = "advanced/loaders/deprecated"
    INPUTS = (FileChoice("model_path", folder="diffusers", choices=diffusers_names),)
    OUTPUTS = (Output(MODEL), Output(CLIP), Output(VAE))

    def run(self, ctx: RunContext, model_path: str) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
        folder = ctx.env.folders.resolve("diffusers", model_path)
        return _handles(ctx.env, model_store(ctx.env).checkpoint(folder), model_path)


class VAELoader(Node):
    """Load a VAE file (or "pixel_space", which keeps images as they are) to decode and encode latents."""

    DISPLAY_NAME = "Load VAE"
    CATEGORY = "loaders"
    INPUTS = (FileChoice("vae_name", folder="vae", builtin=(PIXEL_SPACE,)),)
    OUTPUTS = (Output(VAE),)

    def run(self, ctx: RunContext, vae_name: str) -> tuple[VaeHandle]:
        if vae_name == PIXEL_SPACE:
            return (VaeHandle(vae=PixelSpaceVae(), source=PIXEL_SPACE, scaling_factor=1.0),)
        path = ctx.env.folders.resolve("vae", vae_name)
        vae = load_vae_file(path)
        return (VaeHandle(vae=vae, source=vae_name, scaling_factor=vae.config.scaling_factor),)


NODES: tuple[type[Node], ...] = (CheckpointLoaderSimple, VAELoader, DiffusersLoader)
