"""Nodes that write models: CheckpointSave, ModelSave, CLIPSave, VAESave
(comfy_extras/nodes_model_merging.py: ids, inputs, file names, key layouts and metadata).

Each writes `<prefix>_<counter:05>_.safetensors` under the output folder with the handle's patches
(LoRAs, merges) applied, in ComfyUI's layout:

* CheckpointSave: the whole checkpoint (SD1.x original layout, SDXL SGM layout), fp16.
* ModelSave: the UNet alone under `model.diffusion_model.`, fp16.
* CLIPSave: one file per text encoder, `<prefix>_clip_l` (and `<prefix>_clip_g` for SDXL) in
  transformers' layout (`text_model.`..., bigG's `text_projection.weight`) plus `logit_scale`, fp16.
* VAESave: the VAE's original keys without `first_stage_model.`, in the VAE's own precision (fp32).

Metadata as ComfyUI's `save_checkpoint`: `modelspec.predict_key` from the model type the file was
loaded with (not from a ModelSampling* node; `sampling_markers` has the extra keys), the other
ModelSpec keys for SDXL only, `prompt` (empty without one) and each extra_pnginfo key unless
metadata is disabled.
A file is written aside and linked into place, so a crash never leaves a half-written model under
its name and two writers never share a counter; a prefix that escapes the output folder is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from nodegraph.node import Hidden, Node, Result, RunContext, Socket, String
from nodegraph.types import CLIP, MODEL, VAE
from nodes.image import save_path
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle

LOGIT_SCALE = 4.6055  # ComfyUI's SDClipModel.logit_scale, saved with every text encoder

_HIDDEN = (Hidden("prompt", kind="PROMPT"), Hidden("extra_pnginfo", kind="EXTRA_PNGINFO"))


def write_safetensors(state: dict[str, Any], prefix: str, output_dir: Path, metadata: dict[str, str]) -> Path:
    """Write `<stem>_<counter:05>_.safetensors` whole under a name no other writer holds."""
    from safetensors.torch import save_file

    folder, stem, counter, _ = save_path(prefix, output_dir, 0, 0)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".safetensors.partial", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        for _ in range(10_000):
            target = folder / f"{stem}_{counter:05}_.safetensors"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                counter += 1
            except OSError:  # no hard links on this file system: create the name exclusively
                try:
                    with open(tmp, "rb") as src, open(target, "xb") as out:
                        shutil.copyfileobj(src, out)
                    return target
                except FileExistsError:
                    counter += 1
        raise FileExistsError(f"no free file name for {stem!r} in {folder}")
    finally:
        os.unlink(tmp)


def prompt_metadata(ctx: RunContext, prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    """`prompt` (empty without one) and each extra_pnginfo key as JSON, unless metadata is off."""
    if ctx.env.disable_metadata:
        return {}
    meta = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    for key, value in (extra_pnginfo or {}).items() if isinstance(extra_pnginfo, dict) else ():
        meta[key] = json.dumps(value)
    return meta


def predict_key(model: ModelHandle) -> str | None:
    """`modelspec.predict_key` from the model type the file was loaded with (ComfyUI reads
    `model.model.model_type`, which ModelSamplingDiscrete does not change): "epsilon", "v", or none
    (a continuous EDM model such as CosXL or Playground v2.5)."""
    base = model.base_sampling
    if base.sigma_range is not None:
        return None
    return {"eps": "epsilon", "v_prediction": "v"}.get(base.prediction)


def model_metadata(model: ModelHandle, refiner: bool, title: str) -> dict[str, str]:
    """save_checkpoint's ModelSpec keys: architecture and friends for SDXL only, the predict key."""
    meta: dict[str, str] = {}
    if model.family.startswith("sdxl"):
        meta["modelspec.architecture"] = (
            "stable-diffusion-xl-v1-refiner" if refiner else "stable-diffusion-xl-v1-base"
        )
        meta |= {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.implementation": "sgm",
            "modelspec.title": title,
        }
    key = predict_key(model)
    if key is not None:
        meta["modelspec.predict_key"] = key
    return meta


def sampling_markers(model: ModelHandle) -> dict[str, Any]:
    """The extra keys ComfyUI's save_checkpoint writes beside the weights (nodes_model_merging.py):

    * `edm_vpred.sigma_max` / `.sigma_min` when the model is sampled on a continuous EDM schedule
      as v_prediction or edm (ComfyUI tests `isinstance(model_sampling, V_PREDICTION)`, and its EDM
      class derives from V_PREDICTION), whether the file said so or ModelSamplingContinuousEDM did;
    * `v_pred` only when the file was loaded as v-prediction (the model type, not a
      ModelSamplingDiscrete patch), with `ztsnr` when the sampling in use has zero terminal SNR.
    """
    import torch

    current, base = model.sampling, model.base_sampling
    out: dict[str, Any] = {}
    if current.sigma_range is not None and current.prediction in ("v_prediction", "edm"):
        schedule = current.schedule
        out["edm_vpred.sigma_max"] = torch.tensor(float(schedule.sigma_max)).float()
        out["edm_vpred.sigma_min"] = torch.tensor(float(schedule.sigma_min)).float()
    if base.sigma_range is None and base.prediction == "v_prediction":
        out["v_pred"] = torch.tensor([])
        if current.sigma_range is None and current.zsnr:
            out["ztsnr"] = torch.tensor([])
    return out


def _check(node: str, name: str, value: Any, kind: type) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{node}: input {name} expected a {name.upper()} from a loader")


def _title(prefix: str, output_dir: Path) -> str:
    _, stem, counter, _ = save_path(prefix, output_dir, 0, 0)
    return f"{stem} {counter}"


class CheckpointSave(Node):
    """Save model, CLIP and VAE with their LoRAs and merges applied as one checkpoint file."""

    DISPLAY_NAME = "Save Checkpoint"
    CATEGORY = "advanced/model_merging"
    OUTPUT_NODE = True
    INPUTS = (
        Socket("model", MODEL),
        Socket("clip", CLIP),
        Socket("vae", VAE),
        String("filename_prefix", default="checkpoints/ComfyUI"),
        *_HIDDEN,
    )
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        clip: ClipHandle,
        vae: VaeHandle,
        filename_prefix: str,
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        from nodes.sd.lora.ldm_export import ldm_state_dict, sgm_state_dict
        from nodes.sd.patcher import patched, patched_clip

        for name, value, kind in (
            ("model", model, ModelHandle),
            ("clip", clip, ClipHandle),
            ("vae", vae, VaeHandle),
        ):
            _check("CheckpointSave", name, value, kind)
        out_dir = ctx.env.folders.output_dir
        clip_g = getattr(clip, "text_encoder_2", None)
        refiner = clip_g is not None and clip.text_encoder is None
        meta = model_metadata(model, refiner, _title(filename_prefix, out_dir))
        meta |= prompt_metadata(ctx, prompt, extra_pnginfo)
        with patched(model.unet, model.loras, target="unet", exact=True), patched_clip(clip):
            if clip_g is not None:
                state = sgm_state_dict(model.unet, clip.text_encoder, clip_g, vae.vae)
            else:
                state = ldm_state_dict(model.unet, clip.text_encoder, vae.vae)
        write_safetensors(state | sampling_markers(model), filename_prefix, out_dir, meta)
        return Result((), None)


class ModelSave(Node):
    """Save the model (UNet) alone, with its LoRAs and merges applied."""

    CATEGORY = "advanced/model_merging"
    OUTPUT_NODE = True
    INPUTS = (Socket("model", MODEL), String("filename_prefix", default="diffusion_models/ComfyUI"), *_HIDDEN)
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        model: ModelHandle,
        filename_prefix: str,
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        import torch

        from nodes.sd.lora.ldm_export import unet_state_dict
        from nodes.sd.patcher import patched

        _check("ModelSave", "model", model, ModelHandle)
        out_dir = ctx.env.folders.output_dir
        meta = model_metadata(model, model.family == "sdxl_refiner", _title(filename_prefix, out_dir))
        meta |= prompt_metadata(ctx, prompt, extra_pnginfo)
        with patched(model.unet, model.loras, target="unet", exact=True):
            state = unet_state_dict(model.unet, torch.float16)
        write_safetensors(state | sampling_markers(model), filename_prefix, out_dir, meta)
        return Result((), None)


def clip_state_dict(module: Any, with_projection: bool) -> dict[str, Any]:
    """A transformers text encoder's weights in transformers' layout, fp16, plus logit_scale."""
    import torch

    out: dict[str, Any] = {}
    for name, p in module.named_parameters():
        if name.startswith("text_projection."):
            if with_projection:
                out[name] = p.detach().to("cpu", torch.float16).contiguous()
            continue
        inner = name[len("text_model.") :] if name.startswith("text_model.") else name
        out["text_model." + inner] = p.detach().to("cpu", torch.float16).contiguous()
    out["logit_scale"] = torch.tensor(LOGIT_SCALE, dtype=torch.float16)
    return out


class CLIPSave(Node):
    """Save the text encoder(s) with their LoRAs and merges applied, one file per encoder."""

    CATEGORY = "advanced/model_merging"
    OUTPUT_NODE = True
    INPUTS = (Socket("clip", CLIP), String("filename_prefix", default="clip/ComfyUI"), *_HIDDEN)
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        clip: ClipHandle,
        filename_prefix: str,
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        from nodes.sd.patcher import patched_clip

        _check("CLIPSave", "clip", clip, ClipHandle)
        meta = prompt_metadata(ctx, prompt, extra_pnginfo)
        if meta:
            meta = {"format": "pt", **meta}
        clip_g = getattr(clip, "text_encoder_2", None)
        with patched_clip(clip):
            files = []
            if clip.text_encoder is not None:
                files.append(("clip_l", clip_state_dict(clip.text_encoder, False)))
            if clip_g is not None:
                files.append(("clip_g", clip_state_dict(clip_g, True)))
        for suffix, state in files:
            write_safetensors(state, f"{filename_prefix}_{suffix}", ctx.env.folders.output_dir, meta)
        return Result((), None)


class VAESave(Node):
    """Save the VAE in its original layout."""

    CATEGORY = "advanced/model_merging"
    OUTPUT_NODE = True
    INPUTS = (Socket("vae", VAE), String("filename_prefix", default="vae/ComfyUI_vae"), *_HIDDEN)
    OUTPUTS = ()

    def run(
        self,
        ctx: RunContext,
        vae: VaeHandle,
        filename_prefix: str,
        prompt: dict[str, Any] | None = None,
        extra_pnginfo: dict[str, Any] | None = None,
    ) -> Result:
        from nodes.sd.lora.ldm_export import VAE_PREFIX, vae_state_dict

        _check("VAESave", "vae", vae, VaeHandle)
        dtype = next(vae.vae.parameters()).dtype
        state = {k[len(VAE_PREFIX) :]: v for k, v in vae_state_dict(vae.vae, dtype).items()}
        write_safetensors(
            state, filename_prefix, ctx.env.folders.output_dir, prompt_metadata(ctx, prompt, extra_pnginfo)
        )
        return Result((), None)


NODES: tuple[type[Node], ...] = (CheckpointSave, ModelSave, CLIPSave, VAESave)
