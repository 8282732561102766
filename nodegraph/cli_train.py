"""`nodegraph train-lora`: its flags (kohya's names, nodegraph's older ones), a config file, progress bars.

The training itself is `nodes/train/`, reached through the `nodes` package's entry API
(`nodes.training()`) only when the command runs (torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nodegraph import train_config
from nodegraph.cli_report import CliError
from nodegraph.engine import Engine


def add_arguments(train: argparse.ArgumentParser) -> None:
    train_config.add_arguments(train)


def resolved(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < `--config_file` < flags given on the command line (kohya's order).

    Raises:
        CliError: the config file or a value is bad.
    """
    given = train_config.explicit(args)
    try:
        config = train_config.load_toml(given["config_file"]) if given.get("config_file") else {}
        values, ignored = train_config.resolve(given, config)
    except train_config.ConfigError as exc:
        raise CliError(str(exc)) from exc
    if ignored:
        print(
            f"train-lora: config options not used by nodegraph: {', '.join(sorted(ignored))}", file=sys.stderr
        )
    return values


def train_lora(args: argparse.Namespace, engine: Engine, training: tuple[Any, Any]) -> list[Path]:
    """Train as the flags say; returns the files written. Bad input raises CliError.

    Args:
        args: the parsed flags.
        engine: for its folders.
        training: the trainer's modules (`run`, `request`) from the `nodes` package's entry API.
    """
    values = resolved(args)
    run, request_mod = training  # torch: imported by the `nodes` entry API only when the command runs
    try:
        request = request_mod.from_values(values, device=args.device)
    except train_config.ConfigError as exc:
        raise CliError(str(exc)) from exc
    bars: dict[str, Any] = {}

    def bar(name: str, total: int) -> Any:
        if name not in bars:
            for other in bars.values():
                other.close()
            bars[name] = tqdm(total=total, desc=name, file=sys.stderr, dynamic_ncols=True)
        return bars[name]

    def encoding(done: int, total: int) -> None:
        bar("encoding images", total).update(done - bar("encoding images", total).n)

    averages: list[float] = [0.0]

    def progress(step: int, total: int, loss: float) -> None:
        steps = bar("train-lora", total)
        steps.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{averages[0]:.4f}", refresh=False)
        steps.update(step - steps.n)

    def logged(step: int, loss: float, average: float) -> None:
        averages[0] = average

    def notice(text: str) -> None:
        tqdm.write(f"train-lora: {text}", file=sys.stderr)

    hooks = run.TrainHooks(notice=notice, logged=logged)
    try:
        written: list[Path] = run.train_lora(
            engine.env.folders, request, progress, encoding=encoding, hooks=hooks
        )
        return written
    except run.TrainError as exc:
        raise CliError(str(exc)) from exc
    finally:
        for each in bars.values():
            each.close()
