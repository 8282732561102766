"""Model, input, output and user folders, with ComfyUI's names and `extra_model_paths.yaml`.

Every file name that arrives from a prompt or a request goes through `safe_join` or
`Folders.resolve`, which refuse absolute paths, `..`, NUL and (for the data folders) symlinks
that lead outside, so no name can reach a file outside its folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})

# folder name -> (sub-folders of models/, allowed extensions); ComfyUI's folder_paths.py table.
MODEL_FOLDERS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "checkpoints": (("checkpoints",), MODEL_EXTENSIONS),
    "configs": (("configs",), frozenset({".yaml"})),
    "loras": (("loras",), MODEL_EXTENSIONS),
    "vae": (("vae",), MODEL_EXTENSIONS),
    "text_encoders": (("text_encoders", "clip"), MODEL_EXTENSIONS),
    "diffusion_models": (("unet", "diffusion_models"), MODEL_EXTENSIONS),
    "clip_vision": (("clip_vision",), MODEL_EXTENSIONS),
    "style_models": (("style_models",), MODEL_EXTENSIONS),
    "embeddings": (("embeddings",), MODEL_EXTENSIONS),
    "diffusers": (("diffusers",), frozenset({"folder"})),
    "vae_approx": (("vae_approx",), MODEL_EXTENSIONS),
    # models/ControlNet: A1111's folder (ComfyUI's extra_model_paths a111 example maps it), found as is
    "controlnet": (("controlnet", "t2i_adapter", "ControlNet"), MODEL_EXTENSIONS),
    "gligen": (("gligen",), MODEL_EXTENSIONS),
    "upscale_models": (("upscale_models",), MODEL_EXTENSIONS),
    "hypernetworks": (("hypernetworks",), MODEL_EXTENSIONS),
    "photomaker": (("photomaker",), MODEL_EXTENSIONS),
    "classifiers": (("classifiers",), frozenset({""})),
    "model_patches": (("model_patches",), MODEL_EXTENSIONS),
    "audio_encoders": (("audio_encoders",), MODEL_EXTENSIONS),
}
LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}
DATA_FOLDERS = ("output", "input", "temp")


class PathEscapeError(ValueError):
    """A user-supplied name tried to leave its folder."""


class InvalidNameError(PathEscapeError):
    """A user-supplied name no file system can hold: too long, too deep, or not encodable."""


# POSIX file systems hold 255 bytes per name and 4096 per path; deeper than 32 folders is no
# real layout (a 2,000-level name once created ~1,000 folders before failing).
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_NAME_PARTS = 32


class ModelNotFoundError(FileNotFoundError):
    """A model name does not exist in any directory of its folder."""


def check_relative_name(name: str) -> str:
    """Return `name` as a clean relative POSIX path, or raise `PathEscapeError`."""
    if not isinstance(name, str) or not name:
        raise PathEscapeError("empty file name")
    if "\x00" in name:
        raise PathEscapeError(f"file name {name!r} contains a NUL byte")
    candidate = name.replace("\\", "/")
    if candidate.startswith("/") or (len(candidate) > 1 and candidate[1] == ":"):
        raise PathEscapeError(f"file name {name!r} is absolute")
    parts = [p for p in candidate.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise PathEscapeError(f"file name {name!r} leaves its folder")
    _check_fits(name, parts)
    return "/".join(parts)


def _check_fits(name: str, parts: list[str]) -> None:
    """Refuse names the file system would refuse with an OSError (a server error, not the client's)."""
    shown = name if len(name) <= 80 else name[:60] + "..."
    try:
        sizes = [len(os.fsencode(p)) for p in parts]
    except UnicodeEncodeError as exc:
        raise InvalidNameError(f"file name {shown!r} has characters no file name can hold") from exc
    if any(ch < " " or ch == "\x7f" for ch in name):
        raise InvalidNameError(f"file name {shown!r} has control characters")
    if max(sizes) > MAX_NAME_BYTES or sum(sizes) + len(sizes) > MAX_PATH_BYTES:
        raise InvalidNameError(f"file name {shown!r} is too long (at most {MAX_NAME_BYTES} bytes a part)")
    if len(parts) > MAX_NAME_PARTS:
        raise InvalidNameError(f"file name {shown!r} nests deeper than {MAX_NAME_PARTS} folders")


def safe_join(base: Path, name: str, *, follow_symlinks: bool = False) -> Path:
    """`base / name`, refusing anything that resolves outside `base`.

    Args:
        base: the folder the name must stay in.
        name: a relative name from a request or a prompt.
        follow_symlinks: when False, a symlink that leads outside `base` is refused too.
    """
    rel = check_relative_name(name)
    path = base / rel
    if not follow_symlinks:
        real_base = os.path.realpath(base)
        real = os.path.realpath(path)
        if os.path.commonpath([real_base, real]) != real_base:
            raise PathEscapeError(f"file name {name!r} leads outside {base}")
    return path


@dataclass
class Folders:
    """Where models, inputs, outputs and user data live."""

    base_dir: Path
    output_dir: Path
    input_dir: Path
    temp_dir: Path
    user_dir: Path
    model_dirs: dict[str, list[Path]] = field(default_factory=dict)
    _list_cache: dict[str, tuple[tuple[tuple[str, float], ...], list[str]]] = field(default_factory=dict)

    @classmethod
    def at(
        cls,
        base_dir: Path | str,
        *,
        output_dir: Path | str | None = None,
        input_dir: Path | str | None = None,
        temp_dir: Path | str | None = None,
        user_dir: Path | str | None = None,
    ) -> Folders:
        """Folders under `base_dir` laid out as ComfyUI lays them out (models/, output/, input/ ...)."""
        base = Path(base_dir).absolute()
        folders = cls(
            base_dir=base,
            output_dir=Path(output_dir).absolute() if output_dir else base / "output",
            input_dir=Path(input_dir).absolute() if input_dir else base / "input",
            temp_dir=Path(temp_dir).absolute() if temp_dir else base / "temp",
            user_dir=Path(user_dir).absolute() if user_dir else base / "user",
        )
        for folder, (subdirs, _) in MODEL_FOLDERS.items():
            folders.model_dirs[folder] = [base / "models" / sub for sub in subdirs]
        return folders

    @staticmethod
    def canonical(folder: str) -> str:
        return LEGACY_NAMES.get(folder, folder)

    def add_model_path(self, folder: str, path: Path | str, *, first: bool = False) -> None:
        """Add a directory to a model folder (new folder names are created)."""
        folder = self.canonical(folder)
        dirs = self.model_dirs.setdefault(folder, [])
        p = Path(path)
        if p in dirs:
            dirs.remove(p)
        dirs.insert(0, p) if first else dirs.append(p)
        self._list_cache.pop(folder, None)

    def paths(self, folder: str) -> list[Path]:
        return list(self.model_dirs.get(self.canonical(folder), []))

    def extensions(self, folder: str) -> frozenset[str]:
        entry = MODEL_FOLDERS.get(self.canonical(folder))
        return entry[1] if entry else MODEL_EXTENSIONS

    def list(self, folder: str) -> list[str]:
        """Sorted relative names of the files in a model folder; refreshed when a directory changes."""
        folder = self.canonical(folder)
        dirs = self.model_dirs.get(folder, [])
        stamp = tuple(_dir_stamps(dirs))
        cached = self._list_cache.get(folder)
        if cached and cached[0] == stamp:
            return list(cached[1])
        names = sorted(set(_walk_files(dirs, self.extensions(folder))))
        # keyed by the stamps taken *before* the scan: a file added during it changes them, so the
        # next call rescans instead of serving a list that misses it
        self._list_cache[folder] = (stamp, names)
        return list(names)

    def resolve(self, folder: str, name: str) -> Path:
        """The file for a model name, first match across the folder's directories.

        Raises:
            PathEscapeError: the name is absolute or leaves the folder.
            ModelNotFoundError: no directory of the folder holds it.
        """
        rel = check_relative_name(name)
        folder = self.canonical(folder)
        for directory in self.model_dirs.get(folder, []):
            candidate = directory / rel
            if candidate.is_file() or (candidate.is_dir() and "folder" in self.extensions(folder)):
                return candidate
        where = ", ".join(str(d) for d in self.model_dirs.get(folder, [])) or "(no directories)"
        raise ModelNotFoundError(
            f"{folder} file '{name}' not found in {where}; put it there or pick one that exists"
        )

    def data_dir(self, kind: str) -> Path:
        """The output, input or temp directory."""
        if kind == "output":
            return self.output_dir
        if kind == "input":
            return self.input_dir
        if kind == "temp":
            return self.temp_dir
        raise PathEscapeError(f"unknown folder type {kind!r}; use output, input or temp")

    def annotated(self, name: str, default: str = "input") -> tuple[Path, str]:
        """Split ComfyUI's `"name.png [output]"` annotation into (directory, name)."""
        for kind in DATA_FOLDERS:
            suffix = f" [{kind}]"
            if name.endswith(suffix):
                return self.data_dir(kind), name[: -len(suffix)]
        return self.data_dir(default), name

    def load_extra_model_paths(self, config: Path | str) -> None:
        """Read an `extra_model_paths.yaml` (ComfyUI's format, including its `a111` section)."""
        path = Path(config)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read extra model paths file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"extra model paths file {path} must map section names to folders")
        for section in data.values():
            if isinstance(section, dict):
                self._add_section(section, path.parent)

    def _add_section(self, section: dict[str, Any], yaml_dir: Path) -> None:
        base = section.get("base_path")
        base_path = Path(os.path.expandvars(os.path.expanduser(str(base)))) if base else None
        if base_path is not None and not base_path.is_absolute():
            base_path = yaml_dir / base_path
        first = bool(section.get("is_default", False))
        for folder, value in section.items():
            if folder in ("base_path", "is_default") or value is None:
                continue
            for line in str(value).splitlines():
                line = line.strip()
                if not line:
                    continue
                full = Path(os.path.expandvars(os.path.expanduser(line)))
                if base_path is not None and not full.is_absolute():
                    full = base_path / full
                self.add_model_path(folder, full, first=first)


def _dir_stamps(dirs: Iterable[Path]) -> Iterable[tuple[str, float]]:
    for top in dirs:
        if not top.is_dir():
            yield (str(top), -1.0)
            continue
        for root, subdirs, _ in os.walk(top, followlinks=True):
            subdirs[:] = [d for d in subdirs if d != ".git"]
            yield (root, os.stat(root).st_mtime)


def _walk_files(dirs: Iterable[Path], extensions: frozenset[str]) -> Iterable[str]:
    for top in dirs:
        if not top.is_dir():
            continue
        if "folder" in extensions:
            yield from (p.name for p in top.iterdir() if p.is_dir())
            continue
        for root, subdirs, files in os.walk(top, followlinks=True):
            subdirs[:] = [d for d in subdirs if d != ".git"]
            for fname in files:
                if os.path.splitext(fname)[1].lower() in extensions or "" in extensions:
                    yield Path(root, fname).relative_to(top).as_posix()
