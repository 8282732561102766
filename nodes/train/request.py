"""One training run's request, and its translation to and from kohya's option names.

The command line, a kohya TOML config and the canvas route all give a dict of kohya-named values
(`nodegraph.train_config.resolve`); `from_values` turns it into a `TrainRequest`, and
`to_values` gives the same names back for the file's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodegraph.train_config import (
    ConfigError,
    adafactor_rules,
    first_lr,
    network_args,
    optimizer_args,
    parse_resolution,
    resolve,
)
from nodes.train.captions import CaptionOptions
from nodes.train.trainer import TrainOptions


@dataclass
class TrainRequest:
    """What the command line (or the canvas) asks for, beyond the hyper-parameters."""

    checkpoint: str
    data: Path
    output: str
    options: TrainOptions
    steps: int | None = None
    epochs: int | None = None
    save_every_n_epochs: int | None = None
    save_precision: str = "fp16"
    caption_extension: str = ".txt"
    overwrite: bool = False
    device: str = "auto"  # as the engine's --device: auto (a GPU when torch has one), cpu, cuda:N, mps
    reg_data: Path | None = None
    output_dir: Path | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_state: bool = False
    resume: Path | None = None
    network_weights: Path | None = None
    sample_prompts: Path | None = None
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_sampler: str = "ddim"
    training_comment: str | None = None
    network_args: dict[str, str] = field(default_factory=dict)
    cache_text_encoder_outputs: bool = False  # kohya's SDXL switch; checked, the cache is always on
    # --text_encoder_lr values after the first: kohya's networks.lora does not use them (a notice says so)
    unused_text_encoder_lrs: list[float] = field(default_factory=list)
    values: dict[str, Any] | None = None  # the kohya-named options it came from, when it did


def from_values(values: dict[str, Any], device: str = "auto") -> TrainRequest:
    """A request from resolved kohya-named options.

    Raises:
        ConfigError: a required option is missing or a value is out of range.
    """
    for name, flag in (
        ("pretrained_model_name_or_path", "--checkpoint"),
        ("train_data_dir", "--data"),
        ("output_name", "--output"),
    ):
        if values.get(name) in (None, ""):
            if name == "output_name" and values.get(name) == "":
                break  # an empty name is refused by the save step with its own message
            raise ConfigError(f"{flag} (kohya: --{name}) is required")
    conv = network_args(values)
    kwargs = optimizer_args(values)
    te_lrs = values["text_encoder_lr"]
    if isinstance(te_lrs, list | tuple):  # kohya's metadata records the one value it uses
        values = values | {"text_encoder_lr": first_lr(te_lrs)}
    source = values  # what training uses; `values` becomes what kohya's metadata would record
    if str(values["optimizer_type"]).lower() == "adafactor":
        values, kwargs = adafactor_rules(values, kwargs)
    captions = CaptionOptions(
        shuffle_caption=values["shuffle_caption"],
        keep_tokens=values["keep_tokens"],
        caption_dropout_rate=values["caption_dropout_rate"],
        caption_dropout_every_n_epochs=values["caption_dropout_every_n_epochs"],
        caption_tag_dropout_rate=values["caption_tag_dropout_rate"],
    )
    options = TrainOptions(
        rank=values["network_dim"],
        alpha=values["network_alpha"],
        learning_rate=source["learning_rate"],
        text_encoder_lr=source["text_encoder_lr"],
        unet_lr=source["unet_lr"],
        train_text_encoder=not values["network_train_unet_only"],
        batch_size=values["train_batch_size"],
        resolution=parse_resolution(values["resolution"]) if values["resolution"] not in (None, "") else None,
        seed=values["seed"],
        enable_bucket=values["enable_bucket"],
        min_bucket_reso=values["min_bucket_reso"],
        max_bucket_reso=values["max_bucket_reso"],
        bucket_reso_steps=values["bucket_reso_steps"],
        bucket_no_upscale=values["bucket_no_upscale"],
        captions=captions,
        flip_aug=values["flip_aug"],
        cache_latents=values["cache_latents"],
        cache_latents_to_disk=values["cache_latents_to_disk"],
        cache_text_encoder_outputs_to_disk=bool(values["cache_text_encoder_outputs_to_disk"]),
        prior_loss_weight=values["prior_loss_weight"],
        noise_offset=values["noise_offset"],
        min_snr_gamma=values["min_snr_gamma"],
        clip_skip=values["clip_skip"],
        max_token_length=values["max_token_length"],
        conv_dim=int(conv["conv_dim"]) if "conv_dim" in conv else None,
        conv_alpha=float(conv["conv_alpha"]) if "conv_alpha" in conv else None,
        network_dropout=values["network_dropout"],
        optimizer_type=values["optimizer_type"],
        optimizer_args=kwargs,
        lr_scheduler=values["lr_scheduler"],
        lr_warmup_steps=values["lr_warmup_steps"],
        lr_scheduler_num_cycles=values["lr_scheduler_num_cycles"],
        lr_scheduler_power=values["lr_scheduler_power"],
        max_grad_norm=values["max_grad_norm"],
        gradient_accumulation_steps=values["gradient_accumulation_steps"],
        mixed_precision=values["mixed_precision"],
        gradient_checkpointing=values["gradient_checkpointing"],
    )
    return TrainRequest(
        checkpoint=str(values["pretrained_model_name_or_path"]),
        data=Path(values["train_data_dir"]),
        output=str(values["output_name"]),
        options=options,
        steps=values["max_train_steps"],
        epochs=values["max_train_epochs"],
        save_every_n_epochs=values["save_every_n_epochs"],
        save_precision="fp32" if values["save_precision"] == "float" else values["save_precision"],
        caption_extension=values["caption_extension"],
        overwrite=values["overwrite"],
        device=device,
        reg_data=values["reg_data_dir"],
        output_dir=values["output_dir"],
        save_every_n_steps=values["save_every_n_steps"],
        save_last_n_epochs=values["save_last_n_epochs"],
        save_last_n_steps=values["save_last_n_steps"],
        save_state=values["save_state"],
        resume=values["resume"],
        network_weights=values["network_weights"],
        sample_prompts=values["sample_prompts"],
        sample_every_n_steps=values["sample_every_n_steps"],
        sample_every_n_epochs=values["sample_every_n_epochs"],
        sample_sampler=values["sample_sampler"],
        training_comment=values["training_comment"],
        network_args=conv,
        cache_text_encoder_outputs=bool(
            values["cache_text_encoder_outputs"] or values["cache_text_encoder_outputs_to_disk"]
        ),
        unused_text_encoder_lrs=[float(v) for v in te_lrs[1:]] if isinstance(te_lrs, list | tuple) else [],
        values=values,
    )


def to_values(request: TrainRequest) -> dict[str, Any]:
    """kohya-named options of a request (for the metadata), whether or not it came from them."""
    if request.values is not None:
        return request.values
    o = request.options
    values, _ = resolve({})
    values |= {
        "network_dim": o.rank, "network_alpha": o.alpha, "learning_rate": o.learning_rate,
        "text_encoder_lr": o.text_encoder_lr, "unet_lr": o.unet_lr,
        "network_train_unet_only": not o.train_text_encoder, "train_batch_size": o.batch_size,
        "resolution": ",".join(str(s) for s in o.size), "seed": o.seed, "enable_bucket": o.enable_bucket,
        "min_bucket_reso": o.min_bucket_reso, "max_bucket_reso": o.max_bucket_reso,
        "bucket_reso_steps": o.bucket_reso_steps, "bucket_no_upscale": o.bucket_no_upscale,
        "shuffle_caption": o.captions.shuffle_caption, "keep_tokens": o.captions.keep_tokens,
        "caption_dropout_rate": o.captions.caption_dropout_rate,
        "caption_dropout_every_n_epochs": o.captions.caption_dropout_every_n_epochs,
        "caption_tag_dropout_rate": o.captions.caption_tag_dropout_rate, "flip_aug": o.flip_aug,
        "cache_latents": o.cache_latents, "cache_latents_to_disk": o.cache_latents_to_disk,
        "cache_text_encoder_outputs_to_disk": o.cache_text_encoder_outputs_to_disk,
        "prior_loss_weight": o.prior_loss_weight, "noise_offset": o.noise_offset,
        "min_snr_gamma": o.min_snr_gamma, "clip_skip": o.clip_skip, "max_token_length": o.max_token_length,
        "network_dropout": o.network_dropout, "optimizer_type": o.optimizer_type,
        "lr_scheduler": o.lr_scheduler, "lr_warmup_steps": o.lr_warmup_steps,
        "max_grad_norm": o.max_grad_norm, "gradient_accumulation_steps": o.gradient_accumulation_steps,
        "mixed_precision": o.mixed_precision, "gradient_checkpointing": o.gradient_checkpointing,
        "training_comment": request.training_comment,
    }  # fmt: skip
    return values
