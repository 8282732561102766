"""The node layer's catalog services: what the canvas's LoRA picker shows about each file
(`LoraCatalog`) and what kind of model each checkpoint is (`CheckpointCatalog`).

The server's `/nodegraph/loras`, `/nodegraph/lora_info`, `/nodegraph/lora_preview` and
`/nodegraph/default_workflow` routes (`nodegraph/server/routes_lora.py`) read them through the
torch-free protocols in `nodegraph.services`.
Descriptions come from `nodes.lora_info` (the safetensors header and sidecar files, never the tensors).
Names go through `Folders.resolve`, so no request leaves the loras folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from nodegraph.env import Environment
from nodegraph.folders import Folders, ModelNotFoundError, PathEscapeError
from nodes import lora_info
from nodes.sd.convert_sdxl import checkpoint_family, checkpoint_kind
from nodes.sd.lora.family import compatible, family_name


def describe_lora(name: str, path: Path) -> dict[str, Any]:
    """What the canvas shows for one LoRA (from `nodes.lora_info`); an unreadable file gets an `error`."""
    info: dict[str, Any] = {"name": name, "trigger_words": [], "base_model": "unknown", "rank": None}
    preview = lora_info.preview_image(path)
    info["preview_url"] = f"/nodegraph/lora_preview?name={quote(name)}" if preview else None
    try:
        described = lora_info.lora_info(path)
    except Exception as exc:  # noqa: BLE001 - one unreadable file is reported in its entry, never
        # allowed to take the whole picker down (a crafted header once made the list a 500)
        info["error"] = f"cannot read {path.name}: {exc}"
        return info
    family = str(described.get("family") or "unknown")
    info["trigger_words"] = list(described.get("trigger_words") or [])
    # The family as detected (metadata, then tensor shapes) reads better than kohya's "sd_v1".
    info["base_model"] = (
        family_name(family) if family != "unknown" else described.get("base_model") or "unknown"
    )
    if described.get("sdxl_base"):
        info["base_model"] += f" ({described['sdxl_base']})"
    info["family"] = family  # the canvas marks the LoRAs that fit the connected checkpoint's family
    info["rank"] = described.get("rank")
    info["alpha"] = described.get("alpha")
    info["format"] = described.get("format")
    info["title"] = described.get("title")
    return info


def checkpoint_family_of(folders: Folders, name: str) -> str:
    """The family of a checkpoint file or diffusers folder the canvas names ("unknown" when not found)."""
    for folder in ("checkpoints", "diffusers"):
        try:
            return checkpoint_family(folders.resolve(folder, name))
        except (PathEscapeError, ModelNotFoundError, OSError):
            continue
    return "unknown"


def fits(lora_family: str, model_family: str) -> bool | None:
    """Whether a LoRA fits a checkpoint; None when either family is unknown (the canvas marks nothing)."""
    if "unknown" in (lora_family, model_family):
        return None
    return compatible(lora_family, model_family)


class FolderLoraCatalog:
    """`LoraCatalog` over the environment's loras folders."""

    def __init__(self, env: Environment) -> None:
        self.folders = env.folders

    def list(self, checkpoint: str | None = None) -> list[dict[str, Any]]:
        model_family = checkpoint_family_of(self.folders, checkpoint) if checkpoint else None
        out = []
        for name in self.folders.list("loras"):
            try:
                info = describe_lora(name, self.folders.resolve("loras", name))
            except (PathEscapeError, ModelNotFoundError, FileNotFoundError):
                continue  # removed between listing and reading
            if model_family is not None:
                info["fits"] = fits(str(info.get("family", "unknown")), model_family)
                info["checkpoint_family"] = model_family
            out.append(info)
        return out

    def describe(self, name: str) -> dict[str, Any]:
        return describe_lora(name, self.folders.resolve("loras", name))

    def preview(self, name: str) -> Path | None:
        return lora_info.preview_image(self.folders.resolve("loras", name))


class FolderCheckpointCatalog:
    """`CheckpointCatalog` over the environment's checkpoints folders."""

    def __init__(self, env: Environment) -> None:
        self.folders = env.folders

    def kind(self, name: str) -> str:
        try:
            return checkpoint_kind(self.folders.resolve("checkpoints", name))
        except (PathEscapeError, ModelNotFoundError, OSError):
            return "other"
