"""Files derived from the oracle's mini SDXL checkpoint, for the loader tests.

* `write_depth_variant`: the mini file with fewer UNet blocks, as SSD-1B, Segmind Vega and KOALA
  differ from SDXL (ComfyUI `detect_unet_config`: per-res-block transformer depths, a middle block
  that is a res block alone (`transformer_depth_middle` -1) or absent (-2), asymmetric output
  depths). Its text encoders are cut to their first two layers so the file loads in seconds; every
  kept tensor is the mini file's own, in the dtype asked for.
* `write_diffusers_folder`: a loaded checkpoint as diffusers' `save_pretrained(variant="fp16")`
  lays a pipeline out (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, each a config.json and
  `*.fp16.safetensors`), the tensors taken from the file through the loader's own key map.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nodes.sd.checkpoint import LoadedCheckpoint, SafetensorsSource
from nodes.sd.checkpoint_sdxl import SplitSource

U = "model.diffusion_model."
CLIP_L_LAYERS = "conditioner.embedders.0.transformer.text_model.encoder.layers."
CLIP_G_LAYERS = "conditioner.embedders.1.model.transformer.resblocks."
KEPT_TE_LAYERS = 2

# What each variant does to the mini UNet (levels 320/320/640, 2 res blocks, depths 0/1/2, middle 2):
# ComfyUI lists (transformer_depth, transformer_depth_output in pop order, transformer_depth_middle).
VARIANTS = {
    # SSD-1B / Vega: the middle block is one res block; level 2 loses a transformer block on the
    # input side and on two of its three output blocks.
    "ssd1b": ([0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 2], -1),
    # KOALA: one res block per level (two per output level), no middle block at all.
    "koala": ([0, 1, 2], [0, 0, 1, 1, 2, 2], -2),
}
# koala: old input / output block index -> new (res blocks 2 of each level dropped, see the docstring)
_KOALA_INPUT = {0: 0, 1: 1, 3: 2, 4: 3, 6: 4, 7: 5}
_KOALA_OUTPUT = {0: 0, 2: 1, 3: 2, 5: 3, 6: 4, 8: 5}


def _ssd1b(key: str) -> str | None:
    drop = (
        re.match(rf"{re.escape(U)}input_blocks\.[78]\.1\.transformer_blocks\.1\.", key)
        or re.match(rf"{re.escape(U)}output_blocks\.[12]\.1\.transformer_blocks\.1\.", key)
        or re.match(rf"{re.escape(U)}middle_block\.[12]\.", key)
    )
    return None if drop else key


def _koala(key: str) -> str | None:
    """Keep the first res block of each input level and the outer two output blocks (whose input
    channels still match the skips left), renumbered; drop the middle block."""
    found = re.match(rf"{re.escape(U)}(input_blocks|output_blocks)\.(\d+)\.(.*)", key)
    if found:
        table = _KOALA_INPUT if found[1] == "input_blocks" else _KOALA_OUTPUT
        new = table.get(int(found[2]))
        return None if new is None else f"{U}{found[1]}.{new}.{found[3]}"
    return None if key.startswith(f"{U}middle_block.") else key


def _te_layer_kept(key: str) -> bool:
    for prefix in (CLIP_L_LAYERS, CLIP_G_LAYERS):
        if key.startswith(prefix):
            return int(key[len(prefix) :].split(".", 1)[0]) < KEPT_TE_LAYERS
    return True


def write_depth_variant(
    mini: Path,
    out: Path,
    variant: str,
    dtype: torch.dtype = torch.float16,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """The mini checkpoint with the UNet of `variant` ("ssd1b" / "koala"; "mini": the mini UNet as it
    is), two-layer text encoders, plus the `extra` tensors (marker keys such as `v_pred`)."""
    renames: dict[str, Callable[[str], str | None]] = {"ssd1b": _ssd1b, "koala": _koala, "mini": lambda k: k}
    rename = renames[variant]
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(mini), "pt") as f:
        for key in f.keys():
            new = rename(key)
            if new is not None and _te_layer_kept(key):
                tensors[new] = f.get_tensor(key).to(dtype)
    tensors |= extra or {}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def comfy_lists(config: Any) -> tuple[list[int], list[int], int]:
    """ComfyUI's (transformer_depth, transformer_depth_output, transformer_depth_middle) of a
    diffusers UNet config, to hold a loaded variant against `VARIANTS`."""
    per = config.layers_per_block
    down = [
        d if t.startswith("CrossAttn") else 0
        for d, t in zip(config.transformer_layers_per_block, config.down_block_types, strict=True)
    ]
    reverse = config.reverse_transformer_layers_per_block or [[d] * (per + 1) for d in reversed(down)]
    up: list[int] = []
    for depths, kind in zip(reverse, config.up_block_types, strict=True):
        up += [d if kind.startswith("CrossAttn") else 0 for d in depths]
    middle = {"UNetMidBlock2DCrossAttn": down[-1], "UNetMidBlock2D": -1, None: -2}[config.mid_block_type]
    return [d for d in down for _ in range(per)], up[::-1], middle


_PARTS = {  # component of `ldm_keys` -> (folder, weights file stem)
    "unet": ("unet", "diffusion_pytorch_model"),
    "vae": ("vae", "diffusion_pytorch_model"),
    "te": ("text_encoder", "model"),
    "te2": ("text_encoder_2", "model"),
}


def write_diffusers_folder(loaded: LoadedCheckpoint, out: Path) -> Path:
    """`loaded`'s file as an fp16-variant diffusers SDXL folder (atomically: `out.partial`, then renamed)."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    source = SplitSource(SafetensorsSource(loaded.path))
    modules = {
        "unet": loaded.unet,
        "vae": loaded.vae,
        "te": loaded.text_encoder,
        "te2": loaded.text_encoder_2,
    }
    for component, (folder, stem) in _PARTS.items():
        module = modules[component]
        shapes = {name: value.shape for name, value in module.state_dict().items()}
        tensors = {
            name: source.get(ldm).reshape(shapes[name]).to(torch.float16).contiguous()
            for ldm, (part, name) in loaded.ldm_keys.items()
            if part == component
        }
        (partial / folder).mkdir(parents=True)
        save_file(tensors, str(partial / folder / f"{stem}.fp16.safetensors"), metadata={"format": "pt"})
        _write_config(module, partial / folder)
        del tensors
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    partial.rename(out)
    return out


def _write_config(module: Any, folder: Path) -> None:
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
        return
    config = copy.deepcopy(module.config)  # transformers: what save_pretrained records
    config.architectures = [type(module).__name__]
    config.dtype = "float16"
    config.save_pretrained(folder)


def render(
    ctx: Any, handles: tuple[Any, Any, Any], steps: int = 1, size: int = 64, **sampling: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, image) of a small txt2img through the nodes (euler / normal, cfg 7, seed 42 unless given)."""
    from nodes.conditioning import CLIPTextEncode
    from nodes.image import VAEDecode
    from nodes.latent import EmptyLatentImage
    from nodes.sampling import KSampler

    model, clip, vae = handles
    pos = CLIPTextEncode().run(ctx, "a photo of a cat sitting on a red chair", clip)[0]
    neg = CLIPTextEncode().run(ctx, "blurry", clip)[0]
    latent = EmptyLatentImage().run(ctx, size, size, 1)[0]
    options = {"seed": 42, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal"} | sampling
    out = KSampler().run(
        ctx, model, options["seed"], steps, options["cfg"], options["sampler_name"], options["scheduler"],
        pos, neg, latent, 1.0,
    )[0]  # fmt: skip
    image = VAEDecode().run(ctx, out, vae)[0]
    return out["samples"], image
