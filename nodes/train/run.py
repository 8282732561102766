"""`nodegraph train-lora`: resolve names in the model folders, train, save kohya-format files."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nodegraph.folders import Folders, PathEscapeError
from nodes.sd.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from nodes.sd.device import DeviceError, resolve_device
from nodes.train.dataset import DatasetError, check_resolution, load_dataset
from nodes.train.save import (
    SAVE_DTYPES,
    OutputError,
    RunInfo,
    check_free,
    epoch_path,
    lora_path,
    metadata,
    save_lora,
)
from nodes.train.trainer import LoraTrainer, TrainOptions

Progress = Callable[[int, int, float], None]  # (step, total steps, loss)
Encoding = Callable[[int, int], None]  # (images encoded, images)


class TrainError(ValueError):
    """Anything a user can fix: a missing checkpoint or folder, a bad dataset, an existing output."""


@dataclass
class TrainRequest:
    """What the command line asks for."""

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


def train_lora(
    folders: Folders,
    request: TrainRequest,
    progress: Progress | None = None,
    models: LoadedCheckpoint | None = None,
    encoding: Encoding | None = None,
) -> list[Path]:
    """Train and save; returns the files written (intermediate epochs first, the final file last).

    Every image is read and VAE-encoded before the first step (`encoding` reports it), so a bad
    image is found before any training time is spent.

    Raises:
        TrainError: a problem with the inputs, found before any training step where possible.
    """
    try:
        return _train(folders, request, progress, models, encoding)
    except (DatasetError, OutputError, CheckpointError, PathEscapeError, FileNotFoundError) as exc:
        raise TrainError(str(exc)) from exc


def _check(request: TrainRequest) -> None:
    opts = request.options
    if request.save_precision not in SAVE_DTYPES:
        raise TrainError(f"--save-precision must be one of {', '.join(SAVE_DTYPES)}")
    for flag, value in (("--steps", request.steps), ("--epochs", request.epochs),
                        ("--save-every-n-epochs", request.save_every_n_epochs)):  # fmt: skip
        if value is not None and value < 1:
            raise TrainError(f"{flag} must be at least 1, got {value}")
    if opts.rank < 1 or opts.batch_size < 1:
        raise TrainError("--rank and --batch-size must be at least 1")
    if opts.learning_rate <= 0 or (opts.text_encoder_lr is not None and opts.text_encoder_lr <= 0):
        raise TrainError("learning rates must be positive")
    check_resolution(opts.resolution)


def _train(
    folders: Folders,
    request: TrainRequest,
    progress: Progress | None,
    models: LoadedCheckpoint | None,
    encoding: Encoding | None,
) -> list[Path]:
    _check(request)
    try:
        device = resolve_device(request.device)
    except DeviceError as exc:
        raise TrainError(str(exc)) from exc
    started = time.time()
    final = lora_path(folders, request.output)
    dataset = load_dataset(request.data, request.caption_extension)
    per_epoch = math.ceil(dataset.num_train_images / request.options.batch_size)
    max_steps = request.steps or per_epoch * (request.epochs or 1)
    num_epochs = math.ceil(max_steps / per_epoch)
    every = request.save_every_n_epochs
    planned = [epoch_path(final, e) for e in range(1, num_epochs) if every and e % every == 0]
    check_free([*planned, final], request.overwrite)
    if models is None:
        models = load_checkpoint(folders.resolve("checkpoints", request.checkpoint))
    if models.family != "sd15":
        raise TrainError(
            f"'{request.checkpoint}' is a {models.family} checkpoint; train-lora trains SD1.x only"
        )
    opts = request.options
    tag_frequency, dataset_dirs = dataset.metadata_json()
    info = RunInfo(
        output_name=final.stem, checkpoint=request.checkpoint, rank=opts.rank, alpha=opts.alpha,
        learning_rate=opts.learning_rate, unet_lr=opts.learning_rate,
        text_encoder_lr=(opts.text_encoder_lr or opts.learning_rate) if opts.train_text_encoder else None,
        resolution=opts.resolution, batch_size=opts.batch_size, seed=opts.seed, max_steps=max_steps,
        num_epochs=num_epochs, tag_frequency=tag_frequency, dataset_dirs=dataset_dirs,
        num_train_images=dataset.num_train_images, started_at=started,
    )  # fmt: skip
    trainer = LoraTrainer(models, dataset, opts, device)
    written: list[Path] = []
    try:
        for i, sample in enumerate(dataset.samples, 1):
            trainer.moments(sample)  # encode (and so check) every image before the first step
            if encoding is not None:
                encoding(i, len(dataset.samples))

        def on_epoch(epoch: int, step: int) -> None:
            if every and epoch % every == 0:
                path = epoch_path(final, epoch)
                save_lora(
                    trainer.network.lora_state_dict(),
                    metadata(info, step, epoch),
                    path,
                    request.save_precision,
                )
                written.append(path)

        epochs = trainer.run(max_steps, progress, on_epoch)
        meta = metadata(info, trainer.step, epochs)
        save_lora(trainer.network.lora_state_dict(), meta, final, request.save_precision)
        written.append(final)
    finally:
        trainer.close()
    return written
