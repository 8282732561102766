"""Optimizers and learning-rate schedules by kohya's names (`train_util.get_optimizer`, `get_scheduler_fix`).

The schedules are diffusers' `get_scheduler` (the functions kohya calls), stepped once per
optimizer step; a warmup given as a fraction (< 1) is that share of all steps, as kohya's
`int(lr_warmup_steps * max_train_steps)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch


class OptimizerError(ValueError):
    """An optimizer or schedule that cannot be used here; the message says what to do."""


# A constructor taking (param_groups, lr=...): the base Optimizer's own __init__ takes `defaults` instead.
OptimizerClass = Callable[..., torch.optim.Optimizer]


def optimizer_class(name: str, device: torch.device) -> OptimizerClass:
    """kohya's `--optimizer_type` (case-insensitive) -> the class it uses."""
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW
    if key == "adamw8bit":
        try:
            bnb = importlib.import_module("bitsandbytes")
        except ImportError as exc:
            raise OptimizerError(
                "optimizer AdamW8bit needs the bitsandbytes package (pip install bitsandbytes) and a "
                "CUDA GPU; use --optimizer_type AdamW here"
            ) from exc
        if device.type != "cuda":
            raise OptimizerError(f"optimizer AdamW8bit runs on a CUDA GPU, not on {device}; use AdamW")
        cls: type[torch.optim.Optimizer] = bnb.optim.AdamW8bit
        return cls
    modules = {
        "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
        "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    }
    if key in modules:
        module, attr, package = modules[key]
        try:
            found: type[torch.optim.Optimizer] = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise OptimizerError(
                f"optimizer {name} needs the {package} package (pip install {package})"
            ) from exc
        return found
    raise OptimizerError(f"optimizer {name!r} is not supported; use AdamW, AdamW8bit, Lion or Prodigy")


def make_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, device: torch.device
) -> torch.optim.Optimizer:
    cls = optimizer_class(name, device)
    return cls(groups, lr=lr)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """kohya's `ss_optimizer`: the class's module and name (no optimizer_args are supported)."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__name__}"


def warmup_steps(warmup: int | float, total: int) -> int:
    return int(warmup * total) if isinstance(warmup, float) else int(warmup)


def make_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    warmup: int | float,
    total: int,
    cycles: int = 1,
    power: float = 1.0,
) -> Any:
    """diffusers' schedule of that name; `constant` refuses a warmup, as kohya."""
    from diffusers.optimization import get_scheduler

    steps = warmup_steps(warmup, total)
    if name == "constant" and steps:
        raise OptimizerError("lr_scheduler constant takes no warmup; use constant_with_warmup")
    kwargs: dict[str, Any] = {"num_warmup_steps": steps, "num_training_steps": total}
    if name == "constant":
        kwargs = {}
    elif name == "constant_with_warmup":
        kwargs = {"num_warmup_steps": steps}
    elif name == "cosine_with_restarts":
        kwargs["num_cycles"] = cycles
    elif name == "polynomial":
        kwargs["power"] = power
    return get_scheduler(name, optimizer, **kwargs)
