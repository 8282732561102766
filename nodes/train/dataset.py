"""kohya-style training folders: `img/10_mychar woman/` holds images and one caption file per image.

The folder prefix `10_` is how many times each image is repeated per epoch; the rest of the name
(`mychar woman`) is the caption of an image without a caption file (kohya's DreamBooth-style
"class tokens"; `5_` alone gives an empty one, as in kohya). A regularisation folder
(`reg/1_woman/`) has the same layout; kohya stretches its repeats until it matches the training
images, so that an epoch holds both in equal numbers (`balanced_items`).

Every image is opened and decoded when the folder is read, before any model is loaded, so a
corrupt file is named at once.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from nodegraph.images import open_checked
from nodegraph.train_datasets import IMAGE_EXTENSIONS

_FOLDER = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """The training folder cannot be used; the message names the folder or file and what to do."""


@dataclass(frozen=True)
class Sample:
    """One image of the dataset (listed once; repeats are applied when an epoch is drawn)."""

    image: Path
    caption: str
    folder: str  # the subfolder's name, e.g. "10_mychar woman"
    size: tuple[int, int] = (0, 0)  # (width, height) of the file
    is_reg: bool = False


@dataclass
class Subset:
    """One `N_name` subfolder."""

    name: str
    repeats: int
    samples: list[Sample] = field(default_factory=list)
    is_reg: bool = False


@dataclass
class Dataset:
    """Every subset of a training folder and of its regularisation folder."""

    root: Path
    subsets: list[Subset]
    reg_subsets: list[Subset] = field(default_factory=list)
    missing_captions: list[Path] = field(default_factory=list)  # images that use their folder's caption

    @property
    def samples(self) -> list[Sample]:
        return [s for sub in (*self.subsets, *self.reg_subsets) for s in sub.samples]

    @property
    def num_train_images(self) -> int:
        """Training images per epoch, repeats counted (kohya's `ss_num_train_images`)."""
        return sum(sub.repeats * len(sub.samples) for sub in self.subsets)

    @property
    def num_reg_images(self) -> int:
        """Regularisation images with their folders' repeats (kohya's `ss_num_reg_images`)."""
        return sum(sub.repeats * len(sub.samples) for sub in self.reg_subsets)

    def balanced_items(self) -> list[tuple[Sample, int]]:
        """(sample, repeats) of one epoch: kohya's `DreamBoothDataset` balancing.

        Regularisation images are added whole (with their folder's repeats) in order until they
        reach the number of training images; if there are fewer, their repeats grow one at a time,
        round-robin, until they match it (`train_util.py` "num_repeatsを計算する").
        """
        items = [(s, sub.repeats) for sub in self.subsets for s in sub.samples]
        reg = [(s, sub.repeats) for sub in self.reg_subsets for s in sub.samples]
        if not reg:
            return items
        target, n, counts, first = self.num_train_images, 0, [0] * len(reg), True
        while n < target:
            for i, (_, repeats) in enumerate(reg):
                add = repeats if first else 1
                counts[i] += add
                n += add
                if n >= target:
                    break
            first = False
        return items + [(s, c) for (s, _), c in zip(reg, counts, strict=True) if c]

    def epoch_items(self) -> list[Sample]:
        """The samples of one epoch, each repeated (in folder order; shuffle them)."""
        return [s for s, repeats in self.balanced_items() for _ in range(repeats)]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per folder (regularisation too), captions holding each tag."""
        out: dict[str, dict[str, int]] = {}
        for sub in (*self.subsets, *self.reg_subsets):
            counts: Counter[str] = Counter()
            for sample in sub.samples:
                # kohya's set_tag_frequency: split on ",", strip, lower-case, skip empty, count each
                counts.update(t.strip().lower() for t in sample.caption.split(",") if t.strip())
            out[sub.name] = dict(counts)
        return out

    def dataset_dirs(self, reg: bool = False) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs` / `ss_reg_dataset_dirs`: {folder: {"n_repeats", "img_count"}}."""
        subsets = self.reg_subsets if reg else self.subsets
        return {sub.name: {"n_repeats": sub.repeats, "img_count": len(sub.samples)} for sub in subsets}

    def metadata_json(self) -> tuple[str, str]:
        return json.dumps(self.tag_frequency()), json.dumps(self.dataset_dirs())


def load_dataset(root: Path, caption_extension: str = ".txt", reg_root: Path | None = None) -> Dataset:
    """Parse a kohya training folder (and its regularisation folder); every image is checked.

    Raises:
        DatasetError: the folder is missing or is itself a numbered folder, a subfolder lacks the
            `N_` prefix or has 0 repeats, a caption is unreadable or empty, an image is corrupt, or
            there are no images at all.
    """
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    missing: list[Path] = []
    subsets = _subsets(Path(root), ext, missing, "--train_data_dir/--data", is_reg=False)
    reg = _subsets(Path(reg_root), ext, missing, "--reg_data_dir", is_reg=True) if reg_root else []
    dataset = Dataset(Path(root), [s for s in subsets if s.samples], [s for s in reg if s.samples], missing)
    if not any(s.samples for s in subsets):
        found = ", ".join(s.name for s in subsets) or "no subfolders"
        raise DatasetError(
            f"training folder '{root}' holds no images ({found}); put .png/.jpg/.jpeg/.webp/.bmp files "
            "in subfolders named like '10_mychar woman'"
        )
    return dataset


def _subsets(root: Path, ext: str, missing: list[Path], flag: str, *, is_reg: bool) -> list[Subset]:
    if not root.is_dir():
        raise DatasetError(f"{flag} folder '{root}' does not exist or is not a folder")
    if _FOLDER.match(root.name) and _images(root):
        raise DatasetError(
            f"{flag} '{root}' is itself a numbered image folder: point {flag} at its parent "
            f"'{root.parent}', which holds '{root.name}/'"
        )
    subsets: list[Subset] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images(folder)
        match = _FOLDER.match(folder.name)
        if match is None:
            if not images:
                continue  # kohya skips such folders too (sample_images/, logs/ ...)
            raise DatasetError(
                f"subfolder '{folder.name}' in '{root}' has no repeat prefix: name it like "
                f"'10_{folder.name}' (10 repeats per epoch, then the caption for images without a "
                f"{ext} file)"
            )
        if int(match.group(1)) < 1:
            raise DatasetError(
                f"subfolder '{folder.name}' in '{root}' has {int(match.group(1))} repeats; the number "
                f"before '_' is how often each image is used per epoch and must be at least 1 "
                f"(for example '1_{match.group(2)}')"
            )
        subset = Subset(folder.name, int(match.group(1)), is_reg=is_reg)
        class_caption = match.group(2).strip()
        for image in images:
            caption = _caption(image, ext)
            if caption is None:
                missing.append(image)
                caption = class_caption
            subset.samples.append(Sample(image, caption, folder.name, image_size(image), is_reg))
        subsets.append(subset)
    return subsets


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _caption(image: Path, ext: str) -> str | None:
    """kohya's `read_caption`: the first line, stripped; an empty file is an error; None: no file."""
    path = image.with_suffix(ext)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM never reaches a caption or a tag
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"caption file '{path}' cannot be read as UTF-8 text ({exc})") from exc
    lines = text.splitlines()
    if not lines:
        raise DatasetError(f"caption file '{path}' is empty; write the caption in it or delete it")
    return lines[0].strip()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after decoding the whole file, so that a corrupt image is found now.

    Raises:
        DatasetError: naming the file when it cannot be read as an image.
    """
    try:
        with open_checked(path, str(path), frames=False) as img:
            img.load()
            size: tuple[int, int] = img.size
            return size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"image '{path}' cannot be read ({exc}); replace or remove it") from exc


def open_rgb(path: Path) -> Image.Image:
    """The image as RGB (Raises DatasetError naming the file)."""
    try:
        with open_checked(path, str(path), frames=False) as img:
            img.load()
            rgb: Image.Image = img.convert("RGB")
            return rgb
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"image '{path}' cannot be read ({exc}); replace or remove it") from exc
