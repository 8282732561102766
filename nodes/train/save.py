"""Writing a trained LoRA as kohya does: `lora_unet_*`/`lora_te_*` tensors and `ss_*` metadata.

The file is written to a hidden temporary name beside the target and renamed into place only when
complete, so an interrupted save (Ctrl-C, a full disk) leaves no half-written LoRA behind.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nodegraph.folders import Folders, PathEscapeError, safe_join

SD1_ARCH, SDXL_ARCH = "stable-diffusion-v1", "stable-diffusion-xl-v1-base"  # sai_model_spec ARCH_*
STABILITY_IMPL = "https://github.com/Stability-AI/generative-models"  # sai_model_spec IMPL_STABILITY_AI
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class OutputError(ValueError):
    """The output name is unusable: it leaves the loras folder, or the file exists."""


def lora_path(folders: Folders, name: str, output_dir: Path | None = None) -> Path:
    """`<first loras folder, or output_dir>/<name>.safetensors`; the name must be a plain file name."""
    if output_dir is None:
        dirs = folders.paths("loras")
        if not dirs:
            raise OutputError(
                "no loras folder is configured; check --base-directory / extra_model_paths.yaml"
            )
        output_dir = dirs[0]
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    check_output_name(stem)
    try:
        return safe_join(Path(output_dir), f"{stem}.safetensors")
    except PathEscapeError as exc:
        raise OutputError(f"--output {name!r}: {exc}; give a plain name such as 'mychar'") from exc


def check_output_name(stem: str) -> None:
    """A name that every LoRA list shows: not empty, no folder part, not hidden, printable."""
    problem = None
    if not stem.strip():
        problem = "is empty"
    elif "/" in stem or "\\" in stem or os.path.isabs(stem):
        problem = "has a folder part (or is absolute)"
    elif stem.startswith(".") or stem != stem.strip() or stem.endswith("."):
        problem = "starts with '.' or starts/ends with a space or '.'"
    elif any(not ch.isprintable() for ch in stem) or any(ch in stem for ch in '<>:"|?*'):
        problem = 'holds a control character or one of <>:"|?*'
    if problem:
        raise OutputError(f"--output {stem!r} {problem}; give a plain name such as 'mychar'")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def epoch_path(final: Path, epoch: int) -> Path:
    """kohya's name for an intermediate save: `<name>-000002.safetensors`."""
    return final.with_name(f"{final.stem}-{epoch:06d}{final.suffix}")


def step_path(final: Path, step: int) -> Path:
    """kohya's name for a step save: `<name>-step00000010.safetensors`."""
    return final.with_name(f"{final.stem}-step{step:08d}{final.suffix}")


def check_free(paths: list[Path], overwrite: bool) -> None:
    """Refuse (before training) to replace existing files unless `overwrite`."""
    taken = [p for p in paths if p.exists()]
    if taken and not overwrite:
        raise OutputError(
            f"'{taken[0]}' already exists; pick another --output name or pass --overwrite to replace it"
        )


@dataclass
class RunInfo:
    """What the metadata records about the run: kohya's option values and the run's counts."""

    values: dict[str, Any]  # the resolved options under kohya's names (nodegraph.train_config)
    output_name: str
    checkpoint: Path
    max_steps: int
    num_epochs: int
    batches_per_epoch: int
    num_train_images: int
    num_reg_images: int
    tag_frequency: str
    dataset_dirs: str
    reg_dataset_dirs: str
    bucket_info: str
    optimizer: str
    network_args: dict[str, str] = field(default_factory=dict)
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32))
    started_at: float = field(default_factory=time.time)
    model_hashes: tuple[str, str] | None = None  # (old webui hash, sha256)
    family: str = "sd15"  # "sdxl": kohya's sdxl_train_network values


def metadata(info: RunInfo, steps: int, epoch: int) -> dict[str, str]:
    """The `__metadata__` kohya's `train_network.py` (SDXL: `sdxl_train_network.py`, the same keys)
    writes for the same run, key for key.

    kohya's values are `str()` of its argparse values (None -> "None"); options nodegraph does not
    have are written with kohya's defaults. `ss_vae_*`, `ss_datasets` and `modelspec.timestep_range`
    are absent as in kohya without --vae, --dataset_config and min/max timesteps.
    """
    v = info.values
    size = tuple(parse_size(v["resolution"]))
    accum = v["gradient_accumulation_steps"]
    meta: dict[str, Any] = {
        "ss_session_id": info.session_id,
        "ss_training_started_at": info.started_at,
        "ss_output_name": info.output_name,
        "ss_learning_rate": v["learning_rate"],
        "ss_text_encoder_lr": v["text_encoder_lr"],
        "ss_unet_lr": v["unet_lr"],
        "ss_num_train_images": info.num_train_images,
        "ss_num_validation_images": 0,
        "ss_num_reg_images": info.num_reg_images,
        "ss_num_batches_per_epoch": info.batches_per_epoch,
        "ss_num_epochs": info.num_epochs,
        "ss_gradient_checkpointing": bool(v["gradient_checkpointing"]),
        "ss_gradient_accumulation_steps": accum,
        "ss_max_train_steps": info.max_steps,
        "ss_lr_warmup_steps": v["lr_warmup_steps"],
        "ss_lr_scheduler": v["lr_scheduler"],
        "ss_network_module": "networks.lora",
        "ss_network_dim": v["network_dim"],
        "ss_network_alpha": float(v["network_alpha"]),
        "ss_network_dropout": v["network_dropout"],
        "ss_mixed_precision": v["mixed_precision"],
        "ss_full_fp16": False,
        "ss_v2": False,
        # kohya: model_util.get_model_version_str_for_sd1_sd2 / sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
        "ss_base_model_version": "sdxl_base_v1-0" if info.family == "sdxl" else "sd_v1",
        "ss_clip_skip": v["clip_skip"],
        "ss_max_token_length": v["max_token_length"] if v["max_token_length"] != 75 else None,
        "ss_cache_latents": bool(v["cache_latents"] or v["cache_latents_to_disk"]),
        "ss_seed": v["seed"],
        "ss_lowram": False,
        "ss_noise_offset": v["noise_offset"],
        "ss_multires_noise_iterations": None,
        "ss_multires_noise_discount": 0.3,
        "ss_adaptive_noise_scale": None,
        "ss_zero_terminal_snr": False,
        "ss_training_comment": v["training_comment"],
        "ss_sd_scripts_commit_hash": "(unknown)",  # kohya's value when it cannot name its own commit
        "ss_optimizer": info.optimizer,
        "ss_max_grad_norm": v["max_grad_norm"],
        "ss_caption_dropout_rate": v["caption_dropout_rate"],
        "ss_caption_dropout_every_n_epochs": v["caption_dropout_every_n_epochs"],
        "ss_caption_tag_dropout_rate": v["caption_tag_dropout_rate"],
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": v["prior_loss_weight"],
        "ss_min_snr_gamma": v["min_snr_gamma"],
        "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": None,
        "ss_debiased_estimation": False,
        "ss_noise_offset_random_strength": False,
        "ss_ip_noise_gamma_random_strength": False,
        "ss_loss_type": "l2",
        "ss_huber_schedule": "snr",
        "ss_huber_scale": 1.0,
        "ss_huber_c": 0.1,
        "ss_fp8_base": False,
        "ss_fp8_base_unet": False,
        "ss_validation_seed": None,
        "ss_validation_split": 0.0,
        "ss_max_validation_steps": None,
        "ss_validate_every_n_epochs": None,
        "ss_validate_every_n_steps": None,
        "ss_resize_interpolation": None,
        "ss_batch_size_per_device": v["train_batch_size"],
        "ss_total_batch_size": v["train_batch_size"] * accum,
        "ss_resolution": size,
        "ss_color_aug": False,
        "ss_flip_aug": bool(v["flip_aug"]),
        "ss_random_crop": False,
        "ss_shuffle_caption": bool(v["shuffle_caption"]),
        "ss_enable_bucket": bool(v["enable_bucket"]),
        "ss_bucket_no_upscale": bool(v["bucket_no_upscale"]),
        "ss_min_bucket_reso": v["min_bucket_reso"],
        "ss_max_bucket_reso": v["max_bucket_reso"],
        "ss_keep_tokens": v["keep_tokens"],
        "ss_dataset_dirs": info.dataset_dirs,
        "ss_reg_dataset_dirs": info.reg_dataset_dirs,
        "ss_tag_frequency": info.tag_frequency,
        "ss_bucket_info": info.bucket_info,
    }
    if info.network_args:
        meta["ss_network_args"] = json.dumps(info.network_args)
    if info.model_hashes is not None:
        meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"] = info.model_hashes
    meta["ss_sd_model_name"] = info.checkpoint.name
    out = {k: str(val) for k, val in meta.items()}
    now = time.time()
    out |= {"ss_training_finished_at": str(now), "ss_steps": str(steps), "ss_epoch": str(epoch)}
    return out | modelspec(info, size, now)


def modelspec(info: RunInfo, size: tuple[int, ...], timestamp: float) -> dict[str, str]:
    """kohya's `sai_model_spec.build_metadata` for an SD1.x or SDXL LoRA (ModelSpec 1.0.1).

    SDXL: architecture `stable-diffusion-xl-v1-base/lora` and, for an SDXL LoRA, Stability's
    generative-models as the implementation (`determine_implementation`: `lora and sdxl`).
    """
    sdxl = info.family == "sdxl"
    spec = {
        "modelspec.architecture": f"{SDXL_ARCH if sdxl else SD1_ARCH}/lora",
        "modelspec.implementation": STABILITY_IMPL if sdxl else "diffusers",
        "modelspec.title": info.output_name,
        "modelspec.resolution": f"{size[0]}x{size[1]}",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "epsilon",
    }
    if info.values["clip_skip"] is not None:
        spec["modelspec.encoder_layer"] = str(info.values["clip_skip"])
    # kohya writes "sd-scripts/<its commit>"; the same key names the implementation that trained
    spec["modelspec.implementation_version"] = f"nodegraph/{_version()}"
    return spec


def _version() -> str:
    try:
        return importlib.metadata.version("nodegraph")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def parse_size(text: Any) -> tuple[int, int]:
    if isinstance(text, tuple | list):
        return int(text[0]), int(text[1])
    parts = [int(p) for p in str(text).split(",")]
    return (parts[0], parts[-1])


_HASHES: dict[tuple[Path, int, int], tuple[str, str]] = {}


def model_hashes(path: Path) -> tuple[str, str]:
    """kohya's `model_hash` (sha256 of 64 KiB at 1 MiB, 8 hex) and `calculate_sha256` of the file.

    Kept per (path, mtime, size) for the process: a server training twice hashes a checkpoint once.
    """
    st = path.stat()
    key = (path.resolve(), st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        _HASHES[key] = _hash_file(path)
    return _HASHES[key]


def _hash_file(path: Path) -> tuple[str, str]:
    with path.open("rb") as fh:
        fh.seek(0x100000)
        old = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
        fh.seek(0)
        full = hashlib.sha256()
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            full.update(chunk)
    return old, full.hexdigest()


def partial_path(path: Path) -> Path:
    """The hidden temporary name a save is written under (no LoRA list shows it: not `.safetensors`)."""
    return path.with_name(f".{path.name}.partial")


def remove_partials(final: Path) -> list[Path]:
    """Delete the temporary files a killed run of this name left (`.NAME[-000001|-step00000010].safetensors
    .partial`); called when a run of the name starts and when a crashed run is reported. Returns them."""
    stem = re.escape(final.stem)
    pattern = re.compile(rf"\.{stem}(-\d{{6}}|-step\d{{8}})?\.safetensors\.partial")
    removed = []
    try:
        for path in final.parent.iterdir():
            if pattern.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    except OSError:
        pass  # a folder that cannot be listed holds nothing of ours to clean
    return removed


def save_lora(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path, precision: str) -> None:
    """Write the tensors in `precision` (fp16/bf16/fp32) with `meta`, atomically."""
    from safetensors.torch import save_file

    dtype = SAVE_DTYPES[precision]
    out = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        save_file(out, str(partial), metadata=meta)
        os.chmod(partial, 0o666 & ~_umask())  # safetensors writes 0600; kohya's files follow the umask
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
