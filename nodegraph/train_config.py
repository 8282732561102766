"""The options of a LoRA training run, under kohya's names (`train_network.py`), torch-free.

One table serves the command line (`nodegraph train-lora`, every option accepted as
`--kohya_name`, `--kohya-name` and the older nodegraph spelling), kohya's TOML `--config_file`
(flags given on the command line override it, as in kohya) and the canvas's training route.
Defaults are kohya's except where noted in `help` (nodegraph keeps rank/alpha 16, 1e-4, one
epoch, fp16 saves, aspect-ratio buckets on as in the kohya_ss GUI, and a seed of 0).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

SCHEDULERS = (
    "constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial", "adafactor",
)  # fmt: skip
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor")
# The size trained at when none is given, by checkpoint family: kohya's model-spec sizes
# (`sai_model_spec.determine_resolution`), and the kohya_ss GUI's 512,512 field / SDXL presets' 1024,1024.
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024}


def default_resolution(family: str) -> str:
    """`W,H` a run on a checkpoint of `family` trains at unless told ("sdxl_refiner" as SDXL; else 512)."""
    size = NATIVE_RESOLUTION["sdxl" if family.startswith("sdxl") else "sd15"]
    return f"{size},{size}"


class ConfigError(ValueError):
    """An option or config file a user can fix; the message names it."""


@dataclass(frozen=True)
class Option:
    """One option: its kohya name, value type, default, older nodegraph spellings, help."""

    name: str
    type: Any  # int, float, str, bool (a switch), "int_or_float", "list" (repeatable strings),
    # "float_list" (one or more numbers: kohya's nargs="*" --text_encoder_lr), Path
    default: Any = None
    aliases: tuple[str, ...] = ()
    help: str = ""
    choices: tuple[Any, ...] | None = None


OPTIONS: tuple[Option, ...] = (
    Option("pretrained_model_name_or_path", str, None, ("--checkpoint",),
           "the SD1.x or SDXL base checkpoint (the family is read from the file): a name in "
           "models/checkpoints or a file path"),
    Option("train_data_dir", Path, None, ("--data",),
           "the folder holding N_caption subfolders (N = repeats per epoch) of images and captions"),
    Option("reg_data_dir", Path, None, ("--reg-data",), "regularisation folder: 1_CLASS/ subfolders"),
    Option("output_name", str, None, ("--output",), "the LoRA's name: models/loras/NAME.safetensors"),
    Option("output_dir", Path, None, (), "write the LoRA here instead of the first loras folder"),
    Option("max_train_steps", int, None, ("--steps",), "optimizer steps in all"),
    Option("max_train_epochs", int, None, ("--epochs",), "passes over the data (default 1; wins over steps)"),
    Option("network_module", str, "networks.lora", (),
           "only networks.lora (LoRA, and LoCon with conv_dim); LyCORIS modules are refused",
           ("networks.lora",)),
    Option("network_dim", int, 16, ("--rank",), "LoRA rank (nodegraph default 16)"),
    Option("network_alpha", float, 16.0, ("--alpha",), "LoRA alpha; the update is scaled by alpha/rank"),
    Option("conv_dim", int, None, ("--conv-rank",), "LoCon: also adapt 3x3 convolutions with this rank"),
    Option("conv_alpha", float, None, (), "LoCon alpha (default 1, as kohya)"),
    Option("network_dropout", float, None, (), "dropout of the LoRA down output while training"),
    Option("network_args", "list", None, (), "kohya's key=value network args (conv_dim, conv_alpha)"),
    Option("network_weights", Path, None, (), "start from this LoRA file (continue training it)"),
    Option("network_train_unet_only", bool, False, ("--unet-only",), "do not train the text encoder"),
    Option("learning_rate", float, 1e-4, ("--lr",), "learning rate"),
    Option("unet_lr", float, None, (), "UNet learning rate (default learning_rate)"),
    Option("text_encoder_lr", "float_list", None, (),
           "text encoder learning rate (default learning_rate); kohya takes one or more values and, for "
           "networks.lora (SD1.x and SDXL), uses the first for every text encoder"),
    Option("lr_scheduler", str, "constant", (), "learning-rate schedule", SCHEDULERS),
    Option("lr_warmup_steps", "int_or_float", 0, (), "warmup steps, or a fraction of all steps when < 1"),
    Option("lr_scheduler_num_cycles", int, 1, (), "cosine_with_restarts: number of restarts"),
    Option("lr_scheduler_power", float, 1.0, (), "polynomial: the power"),
    Option("optimizer_type", str, "AdamW", (), "optimizer", OPTIMIZERS),
    Option("optimizer_args", "list", None, (), "kohya's key=value optimizer args (weight_decay=0.1 ...)"),
    Option("max_grad_norm", float, 1.0, (), "clip the gradient norm (0: no clipping)"),
    Option("gradient_accumulation_steps", int, 1, (), "batches summed per optimizer step"),
    Option("mixed_precision", str, "no", (), "compute precision", ("no", "fp16", "bf16")),
    Option("gradient_checkpointing", bool, False, (), "recompute activations: less memory, slower"),
    Option("train_batch_size", int, 1, ("--batch-size",), "images per batch"),
    Option("resolution", str, None, ("--max_resolution", "--max-resolution"),
           "training size W,H (or one number); the bucket area with buckets on "
           "(default: 512 for SD1.x, 1024 for SDXL, kohya's model-spec sizes)"),
    Option("enable_bucket", bool, True, (), "aspect-ratio buckets (on by default, as the kohya_ss GUI)"),
    Option("no_bucket", bool, False, ("--no-buckets",), "turn buckets off: resize and centre-crop"),
    Option("min_bucket_reso", int, 256, (), "smallest bucket side"),
    Option("max_bucket_reso", int, 1024, (), "largest bucket side"),
    Option("bucket_reso_steps", int, 64, (), "bucket sides are multiples of this"),
    Option("bucket_no_upscale", bool, False, (), "never enlarge an image to fill a bucket"),
    Option("caption_extension", str, ".txt", (), "caption file extension (nodegraph default .txt)"),
    Option("shuffle_caption", bool, False, (), "shuffle the comma-separated tags each step"),
    Option("keep_tokens", int, 0, (), "keep the first N tags in place when shuffling"),
    Option("caption_dropout_rate", float, 0.0, (), "train this fraction of steps without caption"),
    Option("caption_dropout_every_n_epochs", int, 0, (), "drop every caption every N epochs"),
    Option("caption_tag_dropout_rate", float, 0.0, (), "drop each tag with this probability"),
    Option("flip_aug", bool, False, (), "flip images horizontally at random"),
    Option("cache_latents", bool, False, (), "encode each image once (one posterior sample)"),
    Option("cache_latents_to_disk", bool, False, (), "keep cached latents in .npz files beside the images"),
    Option("cache_text_encoder_outputs", bool, False, (),
           "sdxl_train_network's switch: needs --network_train_unet_only and fixed captions (text is "
           "then encoded once per caption, as without the switch)"),
    Option("cache_text_encoder_outputs_to_disk", bool, False, (),
           "SDXL: also keep them in <image>_te_outputs.npz files (kohya's format), reused while the "
           "caption and the text encoders are unchanged (implies cache_text_encoder_outputs)"),
    Option("disable_mmap_load_safetensors", bool, False, (), "accepted; no effect"),
    Option("prior_loss_weight", float, 1.0, (), "loss weight of regularisation images"),
    Option("noise_offset", float, None, (), "add offset noise of this strength"),
    Option("min_snr_gamma", float, None, (), "min-SNR loss weighting gamma (5 is usual)"),
    Option("clip_skip", int, None, (), "use the text encoder's Nth-from-last layer"),
    Option("max_token_length", int, None, (), "caption tokens: 75, 150 or 225", (None, 75, 150, 225)),
    Option("seed", int, 0, (), "random seed (nodegraph default 0)"),
    Option("save_every_n_epochs", int, None, (), "save NAME-000001 ... every N epochs"),
    Option("save_every_n_steps", int, None, (), "save NAME-step00000010 ... every N steps"),
    Option("save_last_n_epochs", int, None, (), "keep only the last N epoch saves"),
    Option("save_last_n_steps", int, None, (), "keep only the step saves of the last N steps"),
    Option("save_state", bool, False, (), "also save the training state beside each save"),
    Option("resume", Path, None, (), "resume from a saved state folder"),
    Option("save_precision", str, "fp16", (), "dtype of the saved file", ("fp16", "bf16", "fp32", "float")),
    Option("sample_prompts", Path, None, (), "prompt file: one prompt a line with --n --w --h --d --l --s"),
    Option("sample_every_n_steps", int, None, (), "render the sample prompts every N steps"),
    Option("sample_every_n_epochs", int, None, (), "render the sample prompts every N epochs"),
    Option("sample_sampler", str, "ddim", (), "sampler of the sample images (kohya's names)"),
    Option("logging_dir", Path, None, (), "accepted; the loss log is always written to output/NAME/"),
    Option("training_comment", str, None, (), "stored in ss_training_comment"),
    Option("overwrite", bool, False, (), "replace existing files of that name"),
    Option("config_file", Path, None, (), "kohya's TOML config; flags given here override it"),
)  # fmt: skip
BY_NAME = {o.name: o for o in OPTIONS}
# kohya options nodegraph does not implement that change what kohya would train, with kohya's
# defaults: a config file setting one to anything else is refused rather than trained differently.
# (Options that change nothing in the result, such as xformers, sdpa, max_data_loader_n_workers or
# the kohya_ss GUI's epoch field, are listed as not used instead.)
UNSUPPORTED: dict[str, Any] = {
    "v2": False, "v_parameterization": False, "loss_type": "l2", "debiased_estimation_loss": False,
    "ip_noise_gamma": None, "ip_noise_gamma_random_strength": False, "multires_noise_iterations": None,
    "adaptive_noise_scale": None, "noise_offset_random_strength": False, "min_timestep": 0,
    "max_timestep": 1000, "scale_weight_norms": None, "random_crop": False, "color_aug": False,
    "face_crop_aug_range": None, "network_train_text_encoder_only": False, "stop_text_encoder_training": None,
    "weighted_captions": False, "masked_loss": False, "alpha_mask": False, "vae": None,
    "zero_terminal_snr": False, "dataset_config": None, "full_fp16": False, "full_bf16": False,
    "fp8_base": False, "fp8_base_unet": False, "caption_prefix": None, "caption_suffix": None,
    "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False,
    "dim_from_weights": False, "v_pred_like_loss": None, "scale_v_pred_loss_like_noise_pred": False,
    "token_warmup_step": 0, "lr_scheduler_type": None, "lr_scheduler_args": None, "train_inpainting": False,
    "in_json": None, "validation_split": 0.0,
}  # fmt: skip
# Older nodegraph switches kept working; --train-text-encoder is now the default (kohya trains it).
LEGACY_SWITCHES = ("--train-text-encoder",)


def _int_or_float(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in str(text) else value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not true or false")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option as `--kohya_name`, `--kohya-name` and its aliases; unset ones stay absent."""
    group = parser.add_argument_group("training (kohya's names; _ and - both work)")
    for opt in OPTIONS:
        flags = dict.fromkeys([f"--{opt.name}", f"--{opt.name.replace('_', '-')}", *opt.aliases])
        kw: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS, "help": opt.help}
        if opt.type is bool:
            kw["action"] = "store_true"
        elif opt.type == "list":
            kw["nargs"] = "*"
        elif opt.type == "float_list":
            kw["nargs"] = "*"
            kw["type"] = float
            kw["metavar"] = "LR"
        else:
            kw["type"] = _int_or_float if opt.type == "int_or_float" else opt.type
            kw["metavar"] = opt.name.split("_")[-1].upper()
        group.add_argument(*flags, **kw)
    legacy_help = "accepted; the text encoder is trained by default"
    group.add_argument(
        *LEGACY_SWITCHES,
        action="store_true",
        default=argparse.SUPPRESS,
        dest="train_text_encoder",
        help=legacy_help,
    )


def load_toml(path: Path) -> dict[str, Any]:
    """kohya's `read_config_from_file`: sections are flattened into one table; `.toml` may be omitted."""
    path = Path(path)
    if not path.suffix == ".toml" and not path.exists():
        path = path.with_name(path.name + ".toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise ConfigError(f"--config_file '{path}' not found") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config_file '{path}' cannot be read as TOML ({exc})") from exc
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def resolve(
    given: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Defaults, then the config file's values, then `given` (flags or an API request).

    Returns the complete option dict and the config keys that nodegraph does not use (kohya
    configs carry many: xformers, sdpa, ...); unknown keys in `given` are an error, and so is a
    config key of `UNSUPPORTED` set to other than kohya's default.
    """
    values = {o.name: o.default for o in OPTIONS}
    ignored: list[str] = []
    refused = [
        f"{k} = {v!r}"
        for k, v in (config or {}).items()
        if k in UNSUPPORTED and not _is_default(v, UNSUPPORTED[k])
    ]
    if refused:
        raise ConfigError(
            f"the config file sets {', '.join(refused)}: not supported by nodegraph's trainer, and kohya "
            "would train differently with it; remove it (or set kohya's default) to train without it"
        )
    for source, strict in ((config or {}, False), (given, True)):
        for key, raw in source.items():
            name = key.replace("-", "_")
            if name == "train_text_encoder":
                continue  # the old opt-in switch: training the text encoder is now the default
            if name not in BY_NAME:
                if strict:
                    raise ConfigError(f"unknown training option '{key}'")
                ignored.append(key)
                continue
            values[name] = coerce(BY_NAME[name], raw)
    if values.pop("no_bucket"):
        values["enable_bucket"] = False
    values["no_bucket"] = False
    return values, ignored


def _is_default(value: Any, default: Any) -> bool:
    """Whether a config value leaves kohya's behaviour as its default does (the kohya_ss GUI writes
    empty lists and some defaults explicitly)."""
    if value is None or value in ("", [], ()) or value == default:
        return True
    return default in (None, False, 0) and not value


def coerce(opt: Option, raw: Any) -> Any:
    """One value to the option's type; `ConfigError` names the option."""
    try:
        if raw is None or (raw == "" and opt.type not in (str, "list")):
            value: Any = None if opt.type is not bool else False
        elif opt.type is bool:
            value = _bool(raw)
        elif opt.type == "list":
            value = [str(v) for v in raw] if isinstance(raw, list | tuple) else str(raw).split()
        elif opt.type == "float_list":
            value = _float_list(raw)
        elif opt.type == "int_or_float":
            value = raw if isinstance(raw, int | float) and not isinstance(raw, bool) else _int_or_float(raw)
        elif opt.type is int and isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif opt.type is str and opt.name == "resolution" and isinstance(raw, list | tuple):
            value = ",".join(str(v) for v in raw)
        else:
            value = opt.type(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"option {opt.name}: {raw!r} is not a valid {_type_name(opt)}") from exc
    if opt.choices is not None and value not in opt.choices:
        names = ", ".join(str(c) for c in opt.choices if c is not None)
        raise ConfigError(f"option {opt.name}: {value!r} is not one of {names}")
    return value


def _type_name(opt: Option) -> str:
    names = {
        int: "whole number",
        float: "number",
        bool: "true/false",
        "float_list": "number or list of numbers",
    }
    return names.get(opt.type, "value")


def _float_list(raw: Any) -> list[float] | None:
    """kohya's `--text_encoder_lr` (`nargs="*"`): a number, a TOML list (the kohya_ss GUI writes
    `[1e-4, 1e-4]`) or space/comma-separated text; an empty list is None (not given)."""
    if isinstance(raw, bool):
        raise ValueError(raw)
    if isinstance(raw, int | float):
        return [float(raw)]
    items = list(raw) if isinstance(raw, list | tuple) else str(raw).replace(",", " ").split()
    if any(isinstance(v, bool) for v in items):
        raise ValueError(raw)
    return [float(v) for v in items] or None


def first_lr(value: Any) -> float | None:
    """The one text-encoder rate kohya's `networks.lora` uses (`train_network.py`: the network has no
    `prepare_optimizer_params_with_multiple_te_lrs`, so a list gives its first value, for both of
    SDXL's text encoders alike)."""
    if isinstance(value, list | tuple):
        return float(value[0]) if value else None
    return None if value is None else float(value)


def parse_resolution(text: str) -> tuple[int, int]:
    """kohya's `--resolution`: "512" or "512,768" (W,H)."""
    try:
        parts = [int(p) for p in str(text).replace("x", ",").split(",")]
    except ValueError as exc:
        raise ConfigError(f"resolution {text!r} must be W,H or one number, such as 512,512") from exc
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ConfigError(f"resolution {text!r} must be W,H or one number, such as 512,512")
    return parts[0], parts[1]


def network_args(values: Mapping[str, Any]) -> dict[str, str]:
    """kohya's `network_args` (key=value strings) merged with the conv_dim/conv_alpha options."""
    out: dict[str, str] = {}
    for item in values.get("network_args") or ():
        key, sep, value = str(item).partition("=")
        if not sep:
            raise ConfigError(f"network_args item {item!r} must be key=value")
        out[key.strip()] = value.strip()
    if values.get("conv_dim") is not None:
        out["conv_dim"] = str(values["conv_dim"])
    if values.get("conv_alpha") is not None:
        out["conv_alpha"] = str(values["conv_alpha"])
    unknown = set(out) - {"conv_dim", "conv_alpha", "dropout"}
    if unknown:
        raise ConfigError(f"network_args {sorted(unknown)} are not supported (conv_dim, conv_alpha are)")
    return out


def optimizer_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """kohya's `--optimizer_args key=value ...`: each value read as a Python literal, as kohya does
    (`ast.literal_eval`: `0.01`, `True`, `(0.9, 0.99)` or `0.9,0.99`, `'text'`)."""
    out: dict[str, Any] = {}
    for item in values.get("optimizer_args") or ():
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"optimizer_args item {item!r} must be key=value, such as weight_decay=0.01")
        try:
            out[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(
                f"optimizer_args {item!r}: {text.strip()!r} is not a Python literal "
                "(kohya reads values such as 0.01, True, (0.9, 0.99) or 'text')"
            ) from exc
    return out


def adafactor_rules(values: dict[str, Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """kohya's Adafactor set-up (`train_util.get_optimizer`), applied to the options and args.

    `relative_step` is on unless given (and `warmup_init` turns it on); with it Adafactor picks its
    own step size, the learning rate becomes the schedule's initial value (`lr_scheduler`
    `adafactor:LR`) and kohya clears `learning_rate`, `unet_lr` and `text_encoder_lr`, which its
    metadata then shows as None. Returns (options as kohya ends up with them, optimizer args).
    """
    kwargs = dict(kwargs)
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return values, kwargs
    cleared = {"learning_rate": None, "unet_lr": None, "text_encoder_lr": None}
    return dict(values) | {"lr_scheduler": f"adafactor:{values['learning_rate']}"} | cleared, kwargs


def explicit(namespace: argparse.Namespace, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The options actually given on the command line (argparse left the rest unset)."""
    keys = names or [*BY_NAME, "train_text_encoder"]
    return {k: getattr(namespace, k) for k in keys if hasattr(namespace, k)}
