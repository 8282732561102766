"""Writing a trained LoRA as kohya does: `lora_unet_*`/`lora_te_*` tensors and `ss_*` metadata.

The file is written to a hidden temporary name beside the target and renamed into place only when
complete, so an interrupted save (Ctrl-C, a full disk) leaves no half-written LoRA behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nodegraph.folders import Folders, PathEscapeError, safe_join

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class OutputError(ValueError):
    """The output name is unusable: it leaves the loras folder, or the file exists."""


def lora_path(folders: Folders, name: str) -> Path:
    """`<first loras folder>/<name>.safetensors`, refusing names that leave that folder."""
    dirs = folders.paths("loras")
    if not dirs:
        raise OutputError("no loras folder is configured; check --base-directory / extra_model_paths.yaml")
    file_name = name if name.lower().endswith(".safetensors") else f"{name}.safetensors"
    try:
        return safe_join(dirs[0], file_name)
    except PathEscapeError as exc:
        raise OutputError(f"--output {name!r}: {exc}; give a plain name such as 'mychar'") from exc


def epoch_path(final: Path, epoch: int) -> Path:
    """kohya's name for an intermediate save: `<name>-000002.safetensors`."""
    return final.with_name(f"{final.stem}-{epoch:06d}{final.suffix}")


def check_free(paths: list[Path], overwrite: bool) -> None:
    """Refuse (before training) to replace existing files unless `overwrite`."""
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        raise OutputError(
            f"'{taken[0]}' already exists; pick another --output name or pass --overwrite to replace it"
        )


@dataclass
class RunInfo:
    """What the metadata records about the run (kohya's `ss_*` keys)."""

    output_name: str
    checkpoint: str
    rank: int
    alpha: float
    learning_rate: float
    unet_lr: float
    text_encoder_lr: float | None
    resolution: int
    batch_size: int
    seed: int
    max_steps: int
    num_epochs: int
    tag_frequency: str
    dataset_dirs: str
    num_train_images: int
    started_at: float


def metadata(info: RunInfo, steps: int, epoch: int) -> dict[str, str]:
    """The `__metadata__` of a kohya SD1.x LoRA (every value a string, JSON where kohya writes JSON)."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": _num(info.alpha),
        "ss_network_train_unet_only": str(info.text_encoder_lr is None),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": info.checkpoint,
        "ss_output_name": info.output_name,
        "ss_tag_frequency": info.tag_frequency,
        "ss_dataset_dirs": info.dataset_dirs,
        "ss_num_train_images": str(info.num_train_images),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(info.num_epochs),
        "ss_max_train_steps": str(info.max_steps),
        "ss_learning_rate": str(info.learning_rate),
        "ss_unet_lr": str(info.unet_lr),
        "ss_text_encoder_lr": str(info.text_encoder_lr) if info.text_encoder_lr is not None else "None",
        "ss_resolution": f"({info.resolution}, {info.resolution})",
        "ss_batch_size_per_device": str(info.batch_size),
        "ss_seed": str(info.seed),
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_lr_scheduler": "constant",
        "ss_noise_offset": "None",
        "ss_clip_skip": "None",
        "ss_training_started_at": str(info.started_at),
        "ss_training_finished_at": str(time.time()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
    }


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def save_lora(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path, precision: str) -> None:
    """Write the tensors in `precision` (fp16/bf16/fp32) with `meta`, atomically."""
    from safetensors.torch import save_file

    dtype = SAVE_DTYPES[precision]
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        save_file(out, str(partial), metadata=meta)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
