"""`nodegraph train-lora`: resolve names, check everything, train, save kohya-format files.

Everything a user can get wrong (options, the folders and every image in them, the prompt file,
the output names) is checked before the checkpoint is loaded. Files: the LoRA (and its epoch /
step saves) in the loras folder; the loss log, plot, samples and states in `output/NAME/`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nodegraph.folders import Folders, PathEscapeError
from nodegraph.train_config import ConfigError
from nodes.sd.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from nodes.sd.convert_sdxl import checkpoint_family
from nodes.sd.device import DeviceError, resolve_device
from nodes.train.buckets import batches_per_epoch, bucket_info_json
from nodes.train.dataset import DatasetError, load_dataset
from nodes.train.logs import LossRecorder, TrainingLog
from nodes.train.optim import OptimizerError, optimizer_name
from nodes.train.request import TrainRequest, to_values
from nodes.train.samples import SampleError, read_prompts, render
from nodes.train.save import (
    SAVE_DTYPES,
    OutputError,
    RunInfo,
    check_free,
    epoch_path,
    lora_path,
    metadata,
    model_hashes,
    remove_partials,
    save_lora,
    step_path,
)
from nodes.train.state import StateError, load_state, save_state
from nodes.train.trainer import LoraTrainer, TrainOptions, check_resolution, effective_lrs

__all__ = ["TrainError", "TrainHooks", "TrainOptions", "TrainRequest", "train_lora"]

Progress = Callable[[int, int, float], None]  # (step, total steps, loss)
Encoding = Callable[[int, int], None]  # (images encoded, images)
LIVE_PLOT_EVERY_S = 3.0  # how often the loss plot is redrawn mid-epoch when `TrainHooks.plotted` is set


class TrainError(ValueError):
    """Anything a user can fix: a missing checkpoint or folder, a bad dataset, an existing output."""


@dataclass
class TrainHooks:
    """What a caller hears about a run besides the step progress (all optional)."""

    notice: Callable[[str], None] | None = None  # one line for the user (missing captions ...)
    saved: Callable[[Path], None] | None = None  # a LoRA file written
    sampled: Callable[[list[Path]], None] | None = None  # sample images written
    logged: Callable[[int, float, float], None] | None = None  # (step, loss, moving average)
    started: Callable[[dict[str, Any]], None] | None = None  # the run's plan (steps, epochs, files)
    # The loss plot was redrawn (at each epoch's end, and every few seconds while someone watches).
    plotted: Callable[[Path], None] | None = None


@dataclass
class _Plan:
    final: Path
    folder: Path  # output/NAME/
    per_epoch: int
    max_steps: int
    num_epochs: int
    prompts: list[Any] = field(default_factory=list)


def train_lora(
    folders: Folders,
    request: TrainRequest,
    progress: Progress | None = None,
    models: LoadedCheckpoint | None = None,
    encoding: Encoding | None = None,
    hooks: TrainHooks | None = None,
) -> list[Path]:
    """Train and save; returns the LoRA files written (intermediate saves first, the final last).

    Raises:
        TrainError: a problem with the inputs, found before the checkpoint is loaded where possible.
    """
    try:
        return _train(folders, request, progress, models, encoding, hooks or TrainHooks())
    except (
        DatasetError,
        OutputError,
        CheckpointError,
        PathEscapeError,
        FileNotFoundError,
        ConfigError,
        OptimizerError,
        SampleError,
        StateError,
    ) as exc:
        raise TrainError(str(exc)) from exc


def _check(request: TrainRequest) -> None:
    opts = request.options
    if request.save_precision not in SAVE_DTYPES:
        raise TrainError(f"--save_precision must be one of {', '.join(SAVE_DTYPES)}")
    for flag, value in (
        ("--max_train_steps", request.steps),
        ("--max_train_epochs", request.epochs),
        ("--save_every_n_epochs", request.save_every_n_epochs),
        ("--save_every_n_steps", request.save_every_n_steps),
        ("--sample_every_n_steps", request.sample_every_n_steps),
        ("--sample_every_n_epochs", request.sample_every_n_epochs),
        ("--gradient_accumulation_steps", opts.gradient_accumulation_steps),
    ):
        if value is not None and value < 1:
            raise TrainError(f"{flag} must be at least 1, got {value}")
    if opts.rank < 1 or opts.batch_size < 1:
        raise TrainError("--network_dim (--rank) and --train_batch_size (--batch-size) must be at least 1")
    for flag, lr in (
        ("--learning_rate", opts.learning_rate),
        ("--text_encoder_lr", opts.text_encoder_lr),
        ("--unet_lr", opts.unet_lr),
    ):
        if lr is not None and not lr >= 0:  # NaN too
            raise TrainError(f"{flag} must be 0 or more, got {lr}")
    unet_lr, te_lr = effective_lrs(opts)
    if unet_lr == 0 and (te_lr == 0 or not opts.train_text_encoder):
        raise TrainError(
            "nothing would be trained: the UNet's learning rate (--unet_lr, else --learning_rate) is 0 "
            "and the text encoder is not trained (--network_train_unet_only, or --text_encoder_lr 0)"
        )
    if opts.max_token_length not in (None, 75, 150, 225):
        raise TrainError("--max_token_length must be 75, 150 or 225")
    if opts.conv_dim is not None and opts.conv_dim < 1:
        raise TrainError("--conv_dim must be at least 1")
    check_resolution(opts.size)
    if request.cache_text_encoder_outputs:  # kohya's assertions in sdxl_train_network.assert_extra_args
        if opts.train_text_encoder:
            raise TrainError(
                "--cache_text_encoder_outputs needs --network_train_unet_only: the text encoders cannot "
                "be trained from cached outputs"
            )
        if (
            opts.captions.shuffle_caption
            or opts.captions.caption_dropout_rate > 0
            or (opts.captions.caption_tag_dropout_rate > 0)
        ):
            raise TrainError(
                "--cache_text_encoder_outputs cannot be used with shuffle_caption, caption_dropout_rate or "
                "caption_tag_dropout_rate"
            )


TRAINABLE = ("sd15", "sdxl")
FAMILY_TEXT = {"sd15": "SD1.x", "sd2": "SD2", "sdxl": "SDXL base", "sdxl_refiner": "SDXL refiner"}


def _check_family(request: TrainRequest, family: str) -> None:
    """SD1.x (`train_network.py`) and SDXL base (`sdxl_train_network.py`) only, as kohya's LoRA scripts."""
    if family not in TRAINABLE:
        name = FAMILY_TEXT.get(family, family)
        raise TrainError(
            f"'{request.checkpoint}' is an {name} checkpoint; train-lora trains SD1.x and SDXL base LoRAs"
        )
    steps = request.options.bucket_reso_steps
    if family == "sdxl" and request.options.enable_bucket and steps % 32:
        # kohya's sdxl_train_network: `verify_bucket_reso_steps(32)`
        raise TrainError(f"--bucket_reso_steps is {steps}; for SDXL it must be divisible by 32")


def _for_family(request: TrainRequest, family: str) -> TrainRequest:
    """The request with the family's native resolution when none was given (also in its values)."""
    options = request.options.for_family(family)
    if options is request.options:
        return request
    values = request.values
    if values is not None and values.get("resolution") in (None, ""):
        values = values | {"resolution": ",".join(str(v) for v in options.size)}
    return replace(request, options=options, values=values)


def _peek_family(folders: Folders, request: TrainRequest, models: LoadedCheckpoint | None) -> str:
    """The checkpoint's family from its header (no tensor read); "unknown" when it cannot tell."""
    if models is not None:
        return models.family
    try:
        return checkpoint_family(_checkpoint_path(folders, request.checkpoint))
    except (PathEscapeError, FileNotFoundError, OSError):
        return "unknown"  # reported when the checkpoint is loaded


def _checkpoint_path(folders: Folders, name: str) -> Path:
    """A name in models/checkpoints, or (as kohya's --pretrained_model_name_or_path) a file path."""
    path = Path(name).expanduser()
    if path.is_absolute() and path.is_file():
        return path
    return folders.resolve("checkpoints", name)


def _plan(folders: Folders, request: TrainRequest, dataset: Any, hooks: TrainHooks) -> _Plan:
    opts = request.options
    final = lora_path(folders, request.output, request.output_dir)
    folder = folders.output_dir / final.stem
    items = dataset.balanced_items()
    per_epoch = math.ceil(
        batches_per_epoch(items, opts.buckets(), opts.batch_size) / opts.gradient_accumulation_steps
    )
    # kohya: --max_train_epochs wins over --max_train_steps
    max_steps = per_epoch * request.epochs if request.epochs else (request.steps or per_epoch)
    prompts = read_prompts(request.sample_prompts) if request.sample_prompts else []
    if (request.sample_every_n_steps or request.sample_every_n_epochs) and not prompts:
        raise TrainError("--sample_every_n_steps/epochs needs --sample_prompts (a prompt file)")
    return _Plan(final, folder, per_epoch, max_steps, math.ceil(max_steps / per_epoch), prompts)


def _train(
    folders: Folders, request: TrainRequest, progress: Progress | None, models: LoadedCheckpoint | None,
    encoding: Encoding | None, hooks: TrainHooks,
) -> list[Path]:  # fmt: skip
    family = _peek_family(folders, request, models)
    if family != "unknown":
        _check_family(request, family)
    asked, request = request, _for_family(request, family)
    _check(request)
    try:
        device = resolve_device(request.device)
    except DeviceError as exc:
        raise TrainError(str(exc)) from exc
    dataset = load_dataset(request.data, request.caption_extension, request.reg_data)
    if dataset.missing_captions and hooks.notice:
        shown = ", ".join(p.name for p in dataset.missing_captions[:5])
        hooks.notice(
            f"{len(dataset.missing_captions)} images have no caption file and use their folder's "
            f"class tokens as caption: {shown}{' ...' if len(dataset.missing_captions) > 5 else ''}"
        )
    plan = _plan(folders, request, dataset, hooks)
    resumed = request.resume is not None
    planned = (
        []
        if resumed
        else [
            epoch_path(plan.final, e)
            for e in range(1, plan.num_epochs)
            if request.save_every_n_epochs and e % request.save_every_n_epochs == 0
        ]
    )
    check_free([*planned, plan.final], request.overwrite or resumed)
    removed = remove_partials(plan.final)  # left by a run of this name that was killed mid-save
    if removed and hooks.notice:
        hooks.notice(f"removed {len(removed)} unfinished file(s) of an earlier run: {removed[0].name} ...")
    checkpoint = _checkpoint_path(folders, request.checkpoint)
    if models is None:
        models = load_checkpoint(checkpoint)
    _check_family(request, models.family)
    if models.family != family:  # the header did not tell (a .ckpt): plan again for what loaded
        request = _for_family(asked, models.family)
        _check(request)
        plan = _plan(folders, request, dataset, hooks)
    if models.family == "sdxl" and request.options.clip_skip is not None and hooks.notice:
        hooks.notice("--clip_skip does not apply to SDXL (kohya: 'clip_skip will be unexpected'); ignored")
    if request.options.cache_text_encoder_outputs_to_disk and models.family != "sdxl" and hooks.notice:
        hooks.notice(
            "--cache_text_encoder_outputs_to_disk is sdxl_train_network's option; an SD1.x run keeps "
            "the text encoder's outputs in memory"
        )
    first = request.options.text_encoder_lr
    others = [v for v in request.unused_text_encoder_lrs if v != first]  # the kohya_ss GUI repeats the rate
    if others and request.options.train_text_encoder and hooks.notice:
        encoders = "both text encoders" if models.family == "sdxl" else "the text encoder"
        rest = " ".join(f"{v:g}" for v in others)
        hooks.notice(
            f"--text_encoder_lr: kohya's networks.lora uses the first value ({first:g}) for {encoders}; "
            f"{rest} not used"
        )
    opts = request.options
    trainer = LoraTrainer(models, dataset, opts, device, plan.max_steps)
    try:
        return _run(request, plan, trainer, models, checkpoint, dataset, progress, encoding, hooks)
    finally:
        trainer.close()


def _run(
    request: TrainRequest, plan: _Plan, trainer: LoraTrainer, models: LoadedCheckpoint, checkpoint: Path,
    dataset: Any, progress: Progress | None, encoding: Encoding | None, hooks: TrainHooks,
) -> list[Path]:  # fmt: skip
    opts = request.options
    items = dataset.balanced_items()
    tag_frequency, dataset_dirs = dataset.metadata_json()
    info = RunInfo(
        values=to_values(request),
        output_name=plan.final.stem,
        checkpoint=checkpoint,
        max_steps=plan.max_steps,
        num_epochs=plan.num_epochs,
        batches_per_epoch=batches_per_epoch(items, opts.buckets(), opts.batch_size),
        num_train_images=dataset.num_train_images,
        num_reg_images=dataset.num_reg_images,
        tag_frequency=tag_frequency,
        dataset_dirs=dataset_dirs,
        reg_dataset_dirs=_json(dataset.dataset_dirs(reg=True)),
        bucket_info=bucket_info_json(items, opts.buckets()),
        optimizer=optimizer_name(trainer.optimizer, opts.optimizer_args),
        network_args=request.network_args,
        model_hashes=model_hashes(checkpoint) if checkpoint.is_file() else None,
        family=models.family,
    )
    if request.network_weights is not None:
        _load_network_weights(trainer, request.network_weights)
    recorder = LossRecorder()
    if request.resume is not None:
        recorder.load(load_state(trainer, request.resume))
    trainer.prepare(encoding)
    if trainer.latent_cache.reused and hooks.notice:
        hooks.notice(f"latents of {trainer.latent_cache.reused} images read from their disk cache")
    if trainer.te_reused and hooks.notice:
        hooks.notice(
            f"text encoder outputs of {trainer.te_reused} images read from their _te_outputs.npz files"
        )
    log = TrainingLog(plan.folder)
    written: list[Path] = []
    if hooks.started:
        hooks.started(
            {
                "max_steps": plan.max_steps,
                "num_epochs": plan.num_epochs,
                "steps_per_epoch": plan.per_epoch,
                "output": str(plan.final),
                "folder": str(plan.folder),
            }
        )

    def save(path: Path, step: int, epoch: int) -> None:
        save_lora(
            trainer.network.lora_state_dict(), metadata(info, step, epoch), path, request.save_precision
        )
        written.append(path)
        if hooks.saved:
            hooks.saved(path)

    def sample(suffix: str) -> None:
        paths = render(
            plan.prompts,
            models,
            trainer,
            plan.folder / "samples",
            plan.final.stem,
            suffix,
            request.sample_sampler,
        )
        if hooks.sampled:
            hooks.sampled(paths)

    last_plot = [time.monotonic()]

    def plot() -> None:
        path = log.plot()
        last_plot[0] = time.monotonic()
        if hooks.plotted:
            hooks.plotted(path)

    def on_step(step: int, total: int, loss: float) -> None:
        index = step - (trainer.epoch - 1) * plan.per_epoch - 1
        recorder.add(trainer.epoch - 1, index, loss)
        lrs = [float(lr) for lr in trainer.scheduler.get_last_lr()]
        log.add(step, trainer.epoch, loss, recorder.moving_average, lrs)
        if hooks.logged:
            hooks.logged(step, loss, recorder.moving_average)
        if hooks.plotted and time.monotonic() - last_plot[0] >= LIVE_PLOT_EVERY_S:
            plot()  # a watcher (the canvas) sees the curve grow within an epoch
        if progress is not None:
            progress(step, total, loss)
        every = request.save_every_n_steps
        if every and step % every == 0:  # kohya saves the last step too, then the final file
            save(step_path(plan.final, step), step, trainer.epoch)
            _remove_old_step(plan, request, step, written)
            if request.save_state:
                save_state(trainer, recorder.state(), plan.folder / f"{plan.final.stem}-step{step:08d}-state")
        if request.sample_every_n_steps and step % request.sample_every_n_steps == 0:
            sample(f"{step:06d}")

    def on_epoch(epoch: int, step: int) -> None:
        plot()
        every = request.save_every_n_epochs
        if every and epoch % every == 0 and epoch < plan.num_epochs:
            save(epoch_path(plan.final, epoch), step, epoch)
            _remove_old_epoch(plan, request, epoch, written)
            if request.save_state:
                save_state(trainer, recorder.state(), plan.folder / f"{plan.final.stem}-{epoch:06d}-state")
        if request.sample_every_n_epochs and epoch % request.sample_every_n_epochs == 0:
            sample(f"e{epoch:06d}")

    epochs = trainer.run(plan.max_steps, on_step, on_epoch)
    plot()
    save(plan.final, trainer.step, epochs)
    if request.save_state:
        save_state(trainer, recorder.state(), plan.folder / f"{plan.final.stem}-state")
    return written


def _load_network_weights(trainer: LoraTrainer, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        trainer.network.load_weights(tensors)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainError(f"--network_weights '{path}' cannot be used: {exc}") from exc


def _remove_old_step(plan: _Plan, request: TrainRequest, step: int, written: list[Path]) -> None:
    """kohya's `get_remove_step_no`: keep the saves of the last `save_last_n_steps` steps."""
    keep, every = request.save_last_n_steps, request.save_every_n_steps
    if keep is None or not every:
        return
    old = step - keep - 1
    old -= old % every
    if old > 0:
        _remove(step_path(plan.final, old), written)
        _remove_state(plan.folder / f"{plan.final.stem}-step{old:08d}-state")


def _remove_old_epoch(plan: _Plan, request: TrainRequest, epoch: int, written: list[Path]) -> None:
    """kohya's `get_remove_epoch_no`: keep the last `save_last_n_epochs` epoch saves."""
    keep, every = request.save_last_n_epochs, request.save_every_n_epochs
    if keep is None or not every:
        return
    old = epoch - every * keep
    if old > 0:
        _remove(epoch_path(plan.final, old), written)
        _remove_state(plan.folder / f"{plan.final.stem}-{old:06d}-state")


def _remove(path: Path, written: list[Path]) -> None:
    path.unlink(missing_ok=True)
    if path in written:
        written.remove(path)


def _remove_state(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)
