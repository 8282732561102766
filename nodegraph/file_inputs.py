"""Input kinds backed by files: a model file picked from one of ComfyUI's folders, an uploaded image.

The engine gives them their choices (recomputed on every ask, so a file dropped into a folder shows
up without a restart), their fingerprint (a model file's stamp, an image's sha256: a changed file
re-runs the node) and their check, so a node declares `FileChoice("lora_name", folder="loras")` or
`ImageUpload("image")` and writes none of that by hand. Their `/object_info` entries are a combo's.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodegraph.folders import PathEscapeError, safe_join
from nodegraph.inputs import Combo
from nodegraph.primitives import file_stamp

if TYPE_CHECKING:
    from nodegraph.env import Environment


@dataclass(frozen=True)
class FileChoice(Combo):
    """A file (or model folder) in one of ComfyUI's model folders, by name.

    Choices: the folder's files (or `choices(env)` when given, e.g. diffusers folders), then
    `builtin` names that are no file (VAELoader's "pixel_space"). Fingerprint: the file's stamp.
    A name that is not listed fails validation (`value_not_in_list`), as any combo.
    """

    folder: str = ""
    builtin: tuple[str, ...] = ()

    def values(self, env: Environment | None) -> list[str]:
        if env is None:
            return []
        listed = self.choices(env) if callable(self.choices) else env.folders.list(self.folder)
        return [*listed, *self.builtin]

    def fingerprint(self, env: Environment, value: Any) -> Hashable:
        """The file's stamp; None for a built-in name or a name validation rejects."""
        if value in self.builtin:
            return None
        try:
            return file_stamp(env.folders.resolve(self.folder, str(value)))
        except (OSError, ValueError):
            return None

    def check(self, env: Environment, value: Any) -> str | None:
        """Nothing beyond the combo's membership check."""
        return None


def input_images(env: Environment) -> Sequence[str]:
    """Sorted top-level files of the input folder whose type is image/* (ComfyUI's LoadImage list)."""
    folder = env.folders.input_dir
    if not folder.is_dir():
        return []
    names = [f.name for f in folder.iterdir() if f.is_file()]
    return sorted(n for n in names if (mimetypes.guess_type(n)[0] or "").startswith("image/"))


def annotated_path(env: Environment, image: str) -> Path:
    """The file for a LoadImage name (`x.png`, `x.png [output]` ...), never outside its folder.

    Raises:
        PathEscapeError: the name points outside its folder.
    """
    directory, name = env.folders.annotated(image)
    return safe_join(directory, name)


@dataclass(frozen=True)
class ImageUpload(Combo):
    """An image in the input folder that the canvas can upload (LoadImage's `image`).

    Choices: the input folder's images. Accepted: any existing file, also `name [output]` and
    `name [temp]` annotations (ComfyUI's rule, so the membership check is not the test); anything
    else fails with ComfyUI's "Invalid image file". Fingerprint: the file's sha256.
    """

    image_upload: bool = True
    check_membership: bool = False

    def values(self, env: Environment | None) -> list[str]:
        return list(input_images(env)) if env is not None else []

    def fingerprint(self, env: Environment, value: Any) -> Hashable:
        try:
            return hashlib.sha256(annotated_path(env, str(value)).read_bytes()).hexdigest()
        except (OSError, PathEscapeError):
            return None

    def check(self, env: Environment, value: Any) -> str | None:
        """ComfyUI's LoadImage VALIDATE_INPUTS message, or None."""
        try:
            exists = isinstance(value, str) and annotated_path(env, value).is_file()
        except PathEscapeError:
            exists = False
        return None if exists else f"Invalid image file: {value}"


FileInput = FileChoice | ImageUpload
