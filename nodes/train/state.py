"""Training state (kohya's `--save_state` / `--resume`): everything to continue bit-identically.

A state folder `NAME-000002-state/` (or `NAME-step00000010-state/`) in `output/NAME/` holds
`state.pt` — adapter weights in fp32, optimizer, schedule, gradient scaler, every random stream,
the step, the epoch and the position in it — and kohya's `train_state.json` (`current_step`).
Loaded with `weights_only=True`: a state file cannot run code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


class StateError(ValueError):
    """A state folder that cannot be resumed from; the message names it."""


def save_state(trainer: Any, recorder_state: dict[str, Any], folder: Path) -> Path:
    """Write the trainer's state to `folder` (replaced whole, never half-written)."""
    data = {
        "network": {k: v.detach().cpu() for k, v in trainer.network.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "generator": trainer.generator.get_state(),
        "order": _listify(trainer.order.getstate()),
        "caption_rng": _listify(trainer.caption_rng.getstate()),
        "epoch_rng": _listify(trainer.epoch_rng_state),
        "step": trainer.step,
        "epoch": trainer.epoch,
        "batch_index": trainer.batch_index,
        "recorder": recorder_state,
    }
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(data, partial / STATE_FILE)
    (partial / "train_state.json").write_text(
        json.dumps({"current_epoch": trainer.epoch, "current_step": trainer.step})
    )
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder


def load_state(trainer: Any, folder: Path) -> dict[str, Any]:
    """Restore a trainer built with the same options; returns the loss recorder's state.

    Raises:
        StateError: the folder has no state, or its adapters do not fit this run's.
    """
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise StateError(f"--resume '{folder}' holds no {STATE_FILE}; give a NAME-...-state folder")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        trainer.network.load_state_dict(data["network"])
        trainer.optimizer.load_state_dict(data["optimizer"])
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise StateError(
            f"--resume '{folder}' does not fit this run (another rank or model?): {exc}"
        ) from exc
    trainer.scheduler.load_state_dict(data["scheduler"])
    trainer.scaler.load_state_dict(data["scaler"])
    trainer.generator.set_state(data["generator"])
    trainer.order.setstate(_tuplify(data["order"]))
    trainer.caption_rng.setstate(_tuplify(data["caption_rng"]))
    trainer.epoch_rng_state = _tuplify(data["epoch_rng"])
    trainer.step, trainer.epoch, trainer.batch_index = data["step"], data["epoch"], data["batch_index"]
    for lora in trainer.network.loras():
        lora.scale = float(lora.alpha) / lora.rank
    recorder: dict[str, Any] = data["recorder"]
    return recorder


def _listify(state: Any) -> Any:
    return [_listify(x) for x in state] if isinstance(state, tuple | list) else state


def _tuplify(state: Any) -> Any:
    return tuple(_tuplify(x) for x in state) if isinstance(state, list) else state
