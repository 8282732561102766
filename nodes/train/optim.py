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
        "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
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
    raise OptimizerError(
        f"optimizer {name!r} is not supported; use AdamW, AdamW8bit, Lion, Prodigy or Adafactor"
    )


def make_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    device: torch.device,
    kwargs: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """kohya's `get_optimizer`: the class with `lr` and the `--optimizer_args` keywords.

    Adafactor with `relative_step` (kohya's default, see `train_config.adafactor_rules`) finds its
    own step size: the groups' rates are dropped and `lr` is None, as kohya does.
    """
    cls = optimizer_class(name, device)
    kwargs = dict(kwargs or {})
    rate: float | None = lr
    if name.lower() == "adafactor" and kwargs.get("relative_step"):
        for group in groups:
            group.pop("lr", None)
        rate = None
    try:
        return cls(groups, lr=rate, **kwargs)
    except (TypeError, ValueError) as exc:
        raise OptimizerError(f"optimizer {name} with optimizer_args {kwargs}: {exc}") from exc


def optimizer_name(optimizer: torch.optim.Optimizer, kwargs: dict[str, Any] | None = None) -> str:
    """kohya's `ss_optimizer`: the class's module and name, then `(key=value,...)` of its args."""
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in (kwargs or {}).items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


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
    """diffusers' schedule of that name; `constant` refuses a warmup, as kohya.

    `adafactor[:LR]` is transformers' `AdafactorSchedule` (kohya's `get_scheduler_fix`), which reports
    the rate Adafactor chose; it needs the Adafactor optimizer and takes no warmup.
    """
    from diffusers.optimization import get_scheduler

    steps = warmup_steps(warmup, total)
    if name.startswith("adafactor"):
        from transformers.optimization import Adafactor, AdafactorSchedule

        if not isinstance(optimizer, Adafactor):
            raise OptimizerError("lr_scheduler adafactor needs optimizer_type Adafactor")
        if steps:
            raise OptimizerError("lr_scheduler adafactor takes no warmup; leave lr_warmup_steps at 0")
        initial = name.partition(":")[2] or optimizer.param_groups[0].get("lr") or 0.0
        return AdafactorSchedule(optimizer, float(initial))
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
