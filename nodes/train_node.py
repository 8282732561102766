"""Node: TrainLora — a kohya LoRA training run as a queued prompt (canvas and API).

The run is `nodes.train.run.train_lora`, the same as `nodegraph train-lora`: the dataset is a
folder under the input directory (`input/lisa/img/6_lisabp woman/...`), the options default to
the kohya_ss GUI's where nodegraph has them (rank 8, alpha 1, cosine, 1e-4, buckets on, latent
cache on), and any other kohya option can be given in `extra_options` as `--name value` text.
Progress is the prompt's progress (the websocket's `progress` messages, one per optimizer step);
an interrupt stops the run after the current step, keeping every epoch file already saved. The
finished LoRA is in the loras folder at once (lists re-scan it); the node shows the loss plot and
the last sample images, which the history keeps.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from nodegraph import train_config, train_datasets
from nodegraph.env import Environment
from nodegraph.node import Boolean, Combo, Float, Int, Node, Output, Result, RunContext, String
from nodegraph.train_datasets import NONE
from nodegraph.types import STRING


def dataset_folders(env: Environment) -> Sequence[str]:
    """Folders under input/ that hold `N_name` subfolders: kohya datasets (`nodegraph.train_datasets`)."""
    return train_datasets.dataset_folders(env.folders.data_dir("input")) or [NONE]


def _reg_folders(env: Environment) -> Sequence[str]:
    return [NONE, *[f for f in dataset_folders(env) if f != NONE]]


def _checkpoints(env: Environment) -> Sequence[str]:
    return env.folders.list("checkpoints")


def extra_flags(text: str) -> dict[str, Any]:
    """`--name value` / `--name v1 v2` (a list, as kohya's `--optimizer_args a=1 b=2`) / `--switch`
    text (kohya command-line style) -> {name: value}."""
    out: dict[str, Any] = {}
    words = shlex.split(text)
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ValueError(f"extra_options: expected --name, got {word!r}")
        j = i + 1
        while j < len(words) and not words[j].startswith("--"):
            j += 1
        given = words[i + 1 : j]
        out[word[2:].replace("-", "_")] = True if not given else given[0] if len(given) == 1 else given
        i = j
    return out


class TrainLora(Node):
    """Train a kohya-format SD1.x or SDXL LoRA on a dataset folder under input/, as `nodegraph train-lora`."""

    DISPLAY_NAME = "Train LoRA (kohya)"
    CATEGORY = "training"
    OUTPUT_NODE = True
    NOT_IDEMPOTENT = True
    INPUTS = (
        Combo("ckpt_name", choices=_checkpoints, tooltip="The SD1.x or SDXL base checkpoint to train on."),
        Combo("dataset", choices=dataset_folders, tooltip="A folder under input/ with N_name subfolders."),
        Combo("reg_dataset", choices=_reg_folders, tooltip="Regularisation folder (1_class/), or none."),
        String("output_name", "my_lora", tooltip="The LoRA's name: models/loras/NAME.safetensors."),
        Int("epochs", 1, min=1, max=10000),
        Int("save_every_n_epochs", 1, min=0, max=10000, tooltip="0: only the final file."),
        Int("network_dim", 8, min=1, max=1024),
        Float("network_alpha", 1.0, min=0.0, max=1024.0, step=0.5),
        Float("learning_rate", 1e-4, min=1e-8, max=1.0, step=1e-5, round=1e-8),
        Combo("lr_scheduler", choices=train_config.SCHEDULERS, default="cosine"),
        Combo("optimizer_type", choices=train_config.OPTIMIZERS, default="AdamW"),
        Int("train_batch_size", 1, min=1, max=256),
        String(
            "resolution",
            "",
            tooltip="W,H: the bucket area. Empty: by the checkpoint, 512,512 (SD1.x) or 1024,1024 (SDXL).",
        ),
        Combo("mixed_precision", choices=("no", "fp16", "bf16"), default="no"),
        Boolean("train_unet_only", False),
        Int("seed", 0, min=0, max=2**32 - 1),
        String("sample_prompts", "", multiline=True, tooltip="kohya prompt lines (--n --w --h --d --l --s)."),
        Int("sample_every_n_epochs", 1, min=0, max=10000),
        String("extra_options", "", multiline=True, tooltip="More kohya options: --noise_offset 0.05 ..."),
    )
    OUTPUTS = (Output(STRING, name="lora_name"),)

    def run(self, ctx: RunContext, /, **inputs: Any) -> Result:
        from nodes.train.request import from_values
        from nodes.train.run import TrainError, train_lora

        folders = ctx.env.folders
        given = self._options(ctx.env, inputs)
        try:
            values, _ = train_config.resolve(given)
            request = from_values(values, device=getattr(ctx.env, "device", "auto") or "auto")
        except train_config.ConfigError as exc:
            raise ValueError(str(exc)) from exc
        live = LiveView(ctx, folders.data_dir("output"))
        try:
            written = train_lora(folders, request, lambda s, n, _loss: ctx.progress(s, n), hooks=live.hooks())
        except TrainError as exc:
            raise ValueError(str(exc)) from exc
        live.saved = [p.name for p in written]
        return Result(outputs=(written[-1].name,), ui=live.ui(done=True))

    @classmethod
    def after_crash(cls, env: Environment, /, **constants: Any) -> str | None:
        """A training run the server's death stopped fails (hours of work are never restarted unasked),
        naming the files it had finished: each was written whole (atomic rename), so they load."""
        from nodes.train.save import remove_partials

        name = str(constants.get("output_name") or "").strip().removesuffix(".safetensors")
        dirs = env.folders.paths("loras")[:1]  # where train_lora writes
        if name and dirs:
            remove_partials(dirs[0] / f"{name}.safetensors")  # a save the crash cut short
        kept = sorted(
            p.name for d in dirs for p in d.glob(f"{glob_escape(name)}*.safetensors") if _of_run(p.name, name)
        )
        files = (
            f"the files it had saved are kept: {', '.join(kept)}" if kept else "it had saved no LoRA file yet"
        )
        hint = (
            f"; continue from the last one with extra_options '--network_weights {dirs[0] / kept[-1]}'"
            if kept
            else ""
        )
        return f"the server stopped while this training ran (killed, crashed or restarted); {files}{hint}"

    @staticmethod
    def _options(env: Environment, inputs: dict[str, Any]) -> dict[str, Any]:
        """The node's widgets as kohya-named options (extra_options first, the widgets over them)."""
        from nodes.train.save import OutputError, check_output_name

        try:
            check_output_name(str(inputs["output_name"]))  # before anything is written under its name
        except OutputError as exc:
            raise ValueError(f"output_name: {exc}") from exc
        root = env.folders.data_dir("input")
        given = extra_flags(str(inputs.get("extra_options") or ""))
        prompts = str(inputs.get("sample_prompts") or "").strip()
        given |= {
            "pretrained_model_name_or_path": inputs["ckpt_name"],
            "train_data_dir": _under(root, inputs["dataset"], "dataset"),
            "output_name": inputs["output_name"],
            "max_train_epochs": inputs["epochs"],
            "save_every_n_epochs": inputs["save_every_n_epochs"] or None,
            "network_dim": inputs["network_dim"],
            "network_alpha": inputs["network_alpha"],
            "learning_rate": inputs["learning_rate"],
            "lr_scheduler": inputs["lr_scheduler"],
            "optimizer_type": inputs["optimizer_type"],
            "train_batch_size": inputs["train_batch_size"],
            "resolution": inputs["resolution"],
            "mixed_precision": inputs["mixed_precision"],
            "network_train_unet_only": inputs["train_unet_only"],
            "seed": inputs["seed"],
            "cache_latents": given.get("cache_latents", True),  # the kohya_ss GUI's default
        }
        if inputs.get("reg_dataset", NONE) != NONE:
            given["reg_data_dir"] = _under(root, inputs["reg_dataset"], "reg_dataset")
        if prompts:
            out = env.folders.data_dir("output") / str(inputs["output_name"]).strip()
            out.mkdir(parents=True, exist_ok=True)
            (out / "prompts.txt").write_text(prompts + "\n", encoding="utf-8")
            given["sample_prompts"] = out / "prompts.txt"
            given["sample_every_n_epochs"] = inputs["sample_every_n_epochs"] or None
        return given


class LiveView:
    """What the canvas sees of a running training: the step, loss, loss plot and newest samples.

    Each change goes out as an interim `executed` message (`RunContext.show`), so the canvas's
    Train LoRA panel draws the curve and samples while the run goes on; the final output is the same
    shape, and the history keeps the last one (also when the run fails or is cancelled).
    """

    def __init__(self, ctx: RunContext, out_dir: Path) -> None:
        # `show` is optional: a context built outside the executor (a test's) may not offer it.
        self._show = getattr(ctx, "show", None)
        self._warn = ctx.warn
        self._per_epoch = 1
        self._out = out_dir
        self.state: dict[str, Any] = {"step": 0, "max_steps": 0, "epoch": 0, "num_epochs": 0}
        self.plot: Path | None = None
        self.samples: list[Path] = []
        self.saved: list[str] = []

    def hooks(self) -> Any:
        from nodes.train.run import TrainHooks

        return TrainHooks(
            notice=self._notice,
            started=self._started,
            logged=lambda step, loss, avg: self._update(step=step, loss=loss, average=avg),
            plotted=self._plotted,
            sampled=self._sampled,
            saved=self._saved,
        )

    def ui(self, done: bool = False) -> dict[str, Any]:
        shown = [p for p in (self.plot, *self.samples) if p is not None and p.is_file()]
        images = [
            {"filename": p.name, "subfolder": p.parent.relative_to(self._out).as_posix(), "type": "output"}
            for p in shown
        ]
        train = self.state | {"saved": list(self.saved), "done": done}
        return {"images": images, "train": [train], "text": list(self.saved)}

    def _send(self) -> None:
        if self._show is not None:
            self._show(self.ui())

    def _started(self, plan: dict[str, Any]) -> None:
        self._per_epoch = max(1, int(plan["steps_per_epoch"]))
        self._update(max_steps=plan["max_steps"], num_epochs=plan["num_epochs"], epoch=1)

    def _update(self, **changes: Any) -> None:
        if "step" in changes:
            self.state["epoch"] = max(1, -(-int(changes["step"]) // self._per_epoch))
        self.state.update(changes)
        self._send()

    def _notice(self, text: str) -> None:
        self._warn(text)

    def _plotted(self, path: Path) -> None:
        self.plot = path
        self.state["plotted_at_step"] = self.state["step"]  # lets a viewer reload the same file name
        self._send()

    def _sampled(self, paths: list[Path]) -> None:
        self.samples = list(paths)
        self._send()

    def _saved(self, path: Path) -> None:
        self.saved.append(path.name)
        self._send()


def _of_run(file_name: str, name: str) -> bool:
    """Whether a loras-folder file is this run's: NAME.safetensors, NAME-000001 (epoch), NAME-step00000010."""
    stem = file_name.removesuffix(".safetensors")
    return stem == name or re.fullmatch(re.escape(name) + r"-(\d{6}|step\d{8})", stem) is not None


def _under(root: Path, name: str, input_name: str) -> Path:
    from nodegraph.folders import PathEscapeError, safe_join

    if name == NONE:
        raise ValueError(f"{input_name}: put a kohya dataset folder (with 10_name/ subfolders) under {root}")
    try:
        return safe_join(root, name)
    except PathEscapeError as exc:
        raise ValueError(f"{input_name}: {exc}") from exc


NODES: list[type[Node]] = [TrainLora]
