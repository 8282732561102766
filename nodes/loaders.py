"""Nodes: CheckpointLoaderSimple, CheckpointLoader (deprecated, with a config file), VAELoader and
DiffusersLoader. The loaders of single parts (UNETLoader, CLIPLoader, DualCLIPLoader) are in
`nodes.component_loaders`.

Loading goes through the model store (`nodes.sd.model_store`), so every loader node and every
workflow that names the same unchanged file shares one copy of its weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from nodegraph.env import Environment
from nodegraph.node import FileChoice, Node, Output, RunContext
from nodegraph.types import CLIP, MODEL, VAE
from nodes.sd.checkpoint import LoadedCheckpoint, PixelSpaceVae, load_vae_file
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sd.model_sampling import EPS, ModelSampling, checkpoint_sampling
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


def clip_handle(
    env: Environment,
    source: str,
    family: str,
    text_encoder: Any,
    text_encoder_2: Any = None,
    extra: dict[str, Any] | None = None,
) -> ClipHandle:
    """A CLIP handle on loaded text encoders: CLIP-L's tokenizer, the environment's embeddings folders."""
    return ClipHandle(
        text_encoder=text_encoder,
        tokenizer=default_tokenizer(),
        source=source,
        family=family,
        embedding_dirs=tuple(env.folders.paths("embeddings")),
        text_encoder_2=text_encoder_2,
        extra=extra or {},
    )


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
    model = ModelHandle(
        unet=ckpt.unet, source=name, family=ckpt.family, sampling=sampling, base_sampling=sampling
    )
    clip = clip_handle(env, name, ckpt.family, ckpt.text_encoder, ckpt.text_encoder_2)
    vae = VaeHandle(vae=ckpt.vae, source=name, scaling_factor=ckpt.vae.config.scaling_factor)
    return model, clip, vae


@dataclass(frozen=True)
class LdmConfig:
    """What ComfyUI still reads of an LDM yaml config once the checkpoint's own tensors said what it is."""

    v_prediction: bool
    layer_idx: int | None


def read_ldm_config(path: Path, name: str) -> LdmConfig:
    """`model.params.parameterization` ("v": v-prediction) and `cond_stage_config.params.layer_idx`
    (CLIP Set Last Layer), as comfy.sd.load_checkpoint reads them; everything else is ignored."""
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"CheckpointLoader: config '{name}' cannot be read as YAML ({exc})") from exc
    params = data.get("model", {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("cond_stage_config"), dict):
        raise ValueError(
            f"CheckpointLoader: config '{name}' is not an LDM model config "
            "(no model.params.cond_stage_config); "
            "pick one of ComfyUI's models/configs files (v1-inference.yaml ...)"
        )
    clip_params = params["cond_stage_config"].get("params") or {}
    layer_idx = clip_params.get("layer_idx") if isinstance(clip_params, dict) else None
    if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int)):
        raise ValueError(
            f"CheckpointLoader: config '{name}' has layer_idx {layer_idx!r}; expected an integer"
        )
    return LdmConfig(params.get("parameterization") == "v", layer_idx)


class CheckpointLoader(Node):
    """Load a checkpoint with an LDM config file (deprecated): the model is detected from its tensors.

    As in ComfyUI, of the config only `parameterization: v` (v-prediction sampling) and the text
    encoder's `layer_idx` (CLIP Set Last Layer) are used.
    """

    DISPLAY_NAME = "Load Checkpoint With Config (DEPRECATED)"
    CATEGORY = "advanced/loaders"
    DEPRECATED = True
    INPUTS = (FileChoice("config_name", folder="configs"), FileChoice("ckpt_name", folder="checkpoints"))
    OUTPUTS = (Output(MODEL), Output(CLIP), Output(VAE))

    def run(
        self, ctx: RunContext, config_name: str, ckpt_name: str
    ) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
        config = read_ldm_config(ctx.env.folders.resolve("configs", config_name), config_name)
        path = ctx.env.folders.resolve("checkpoints", ckpt_name)
        model, clip, vae = _handles(ctx.env, model_store(ctx.env).checkpoint(path), ckpt_name)
        if config.v_prediction:
            v_pred = ModelSampling(
                "v_prediction", model.sampling.zsnr, latent_format=model.sampling.latent_format
            )
            model = replace(model, sampling=v_pred)
        if config.layer_idx is not None:
            clip = replace(clip, layer_idx=config.layer_idx)
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
        # Through the model store, as checkpoints: one copy per unchanged file for every workflow,
        # counted by the store's bound and dropped by `/free`.
        vae = model_store(ctx.env).load("vae", (path,), lambda: load_vae_file(path))
        return (VaeHandle(vae=vae, source=vae_name, scaling_factor=vae.config.scaling_factor),)


NODES: tuple[type[Node], ...] = (CheckpointLoaderSimple, CheckpointLoader, VAELoader, DiffusersLoader)
