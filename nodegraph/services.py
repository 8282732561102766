"""Services the node layer registers in the `Environment` for the server and the CLI (torch-free).

The engine and the server know these protocols, never their implementations: `nodes/` registers
them (`nodes.register_services(env)`), so HTTP lives in the server while the node layer keeps the
model knowledge. A service that holds memory also implements `nodegraph.env.Freeable`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class LoraCatalog(Protocol):
    """What the canvas shows about LoRA files: trigger words, base model, rank, preview.

    Names are those of the loras folder (`Folders.list("loras")`); they are resolved through
    `Folders.resolve`, so `nodegraph.folders.PathEscapeError` / `ModelNotFoundError` name a refused
    or missing file. Reading a description reads the file's header and sidecars, never its tensors.
    """

    def list(self, checkpoint: str | None = None) -> list[dict[str, Any]]:
        """Every LoRA's description (an unreadable file gets an `error` entry, not an exception).

        With a `checkpoint` name (checkpoints or diffusers folder), each entry also says whether
        the LoRA fits that model: `fits` true, false, or None when either family is unknown, and
        `checkpoint_family` ("unknown" for a name that is not found)."""

    def describe(self, name: str) -> dict[str, Any]:
        """One LoRA's description: name, trigger_words, base_model, rank, alpha, format, title."""

    def preview(self, name: str) -> Path | None:
        """The preview image stored beside the LoRA, if any."""


@runtime_checkable
class CheckpointCatalog(Protocol):
    """What the server knows about a checkpoint file: its kind, for the canvas's first-start graph."""

    def kind(self, name: str) -> str:
        """ "sdxl", "sdxl_refiner" or "other" for a name in the checkpoints folder, from the file's header
        alone; "other" for a file that is missing, refused or unreadable."""


@runtime_checkable
class ModelReads(Protocol):
    """A service that reads model files and counts the reads (a Ray worker reports it for routing)."""

    @property
    def loads(self) -> int:
        """How many model files it has actually read from disk (cache hits not counted)."""


@runtime_checkable
class DeviceInfo(Protocol):
    """The compute device as `/system_stats` reports it (ComfyUI's `devices` entry)."""

    def describe(self) -> dict[str, Any]:
        """name, type, index, vram_total, vram_free, torch_vram_total, torch_vram_free."""


def cpu_device() -> dict[str, Any]:
    """The device entry of an engine whose nodes register no `DeviceInfo` (the CPU, no VRAM)."""
    info: dict[str, Any] = {"name": "cpu", "type": "cpu", "index": 0}
    return info | {"vram_total": 0, "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}
