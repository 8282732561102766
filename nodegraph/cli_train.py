"""`nodegraph train-lora`: its flags, and a run with progress bars (the training is nodes/train/)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nodegraph.cli_report import CliError
from nodegraph.engine import Engine


def add_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--checkpoint", required=True, help="an SD1.x checkpoint in models/checkpoints")
    train.add_argument(
        "--data", required=True, type=Path,
        help="a folder of N_caption subfolders (N = repeats per epoch) holding images and .txt captions",
    )  # fmt: skip
    train.add_argument("--output", required=True, help="the LoRA's name: models/loras/NAME.safetensors")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps in all")
    length.add_argument("--epochs", type=int, default=None, help="passes over the data (default 1)")
    train.add_argument("--rank", type=int, default=16, help="LoRA rank (network dim)")
    train.add_argument(
        "--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/rank"
    )
    train.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--resolution", type=int, default=512, help="square training size, a multiple of 8")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--train-text-encoder", action="store_true", help="also adapt CLIP's attention and MLP"
    )
    train.add_argument("--text-encoder-lr", type=float, default=None, help="its learning rate (default --lr)")
    train.add_argument("--save-every-n-epochs", type=int, default=None, metavar="N")
    train.add_argument("--save-precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    train.add_argument("--caption-extension", default=".txt")
    train.add_argument("--overwrite", action="store_true", help="replace an existing LoRA of that name")


def train_lora(args: argparse.Namespace, engine: Engine) -> list[Path]:
    """Train as the flags say; returns the files written. Bad input raises CliError.

    Raises:
        ModuleNotFoundError: the training package is missing (the caller names it).
    """
    run = importlib.import_module("nodes.train.run")  # torch: only when the command runs
    options = importlib.import_module("nodes.train.trainer").TrainOptions(
        rank=args.rank, alpha=args.alpha, learning_rate=args.lr, text_encoder_lr=args.text_encoder_lr,
        train_text_encoder=args.train_text_encoder, batch_size=args.batch_size,
        resolution=args.resolution, seed=args.seed,
    )  # fmt: skip
    request = run.TrainRequest(
        checkpoint=args.checkpoint, data=args.data, output=args.output, options=options, steps=args.steps,
        epochs=args.epochs, save_every_n_epochs=args.save_every_n_epochs,
        save_precision=args.save_precision, caption_extension=args.caption_extension,
        overwrite=args.overwrite, device=args.device,
    )  # fmt: skip
    bars: dict[str, Any] = {}

    def bar(name: str, total: int) -> Any:
        if name not in bars:
            for other in bars.values():
                other.close()
            bars[name] = tqdm(total=total, desc=name, file=sys.stderr, dynamic_ncols=True)
        return bars[name]

    def encoding(done: int, total: int) -> None:
        bar("encoding images", total).update(done - bar("encoding images", total).n)

    def progress(step: int, total: int, loss: float) -> None:
        steps = bar("train-lora", total)
        steps.set_postfix(loss=f"{loss:.4f}", refresh=False)
        steps.update(step - steps.n)

    try:
        written: list[Path] = run.train_lora(engine.env.folders, request, progress, encoding=encoding)
        return written
    except run.TrainError as exc:
        raise CliError(str(exc)) from exc
    finally:
        for each in bars.values():
            each.close()
