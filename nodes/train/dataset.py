"""kohya-style training folders: `train/10_mychar woman/` holds images and one caption `.txt` per image.

The folder prefix `10_` is how many times each image is repeated per epoch; the rest of the name
(`mychar woman`) is the caption of an image without a caption file (kohya's DreamBooth-style
"class tokens"). Images are resized so the short side is the training resolution, then centre
cropped to a square of that size (kohya's path without aspect-ratio buckets).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nodegraph.images import open_checked

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FOLDER = re.compile(r"^(\d+)_(.+)$")


class DatasetError(ValueError):
    """The training folder cannot be used; the message names the folder or file and what to do."""


@dataclass(frozen=True)
class Sample:
    """One image of the dataset (listed once; repeats are applied when an epoch is drawn)."""

    image: Path
    caption: str
    folder: str  # the subfolder's name, e.g. "10_mychar woman"


@dataclass
class Subset:
    """One `N_name` subfolder."""

    name: str
    repeats: int
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Dataset:
    """Every subset of a training folder."""

    root: Path
    subsets: list[Subset]

    @property
    def samples(self) -> list[Sample]:
        return [s for sub in self.subsets for s in sub.samples]

    @property
    def num_train_images(self) -> int:
        """Images per epoch, repeats counted (kohya's `ss_num_train_images`)."""
        return sum(sub.repeats * len(sub.samples) for sub in self.subsets)

    def epoch_items(self) -> list[Sample]:
        """The samples of one epoch, each repeated as its folder says (in folder order; shuffle them)."""
        return [s for sub in self.subsets for s in sub.samples for _ in range(sub.repeats)]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: per folder, how many captions hold each comma-separated tag."""
        out: dict[str, dict[str, int]] = {}
        for sub in self.subsets:
            counts: Counter[str] = Counter()
            for sample in sub.samples:
                # kohya: caption.split(","), strip, lowercase, skip empty; counted once per image
                counts.update(t.strip().lower() for t in sample.caption.split(",") if t.strip())
            out[sub.name] = dict(counts)
        return out

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs`: {folder: {"n_repeats": N, "img_count": k}}."""
        return {sub.name: {"n_repeats": sub.repeats, "img_count": len(sub.samples)} for sub in self.subsets}

    def metadata_json(self) -> tuple[str, str]:
        return json.dumps(self.tag_frequency()), json.dumps(self.dataset_dirs())


def load_dataset(root: Path, caption_extension: str = ".txt") -> Dataset:
    """Parse a kohya training folder.

    Raises:
        DatasetError: the folder is missing, a subfolder lacks the `N_` repeat prefix, a caption
            cannot be read, or there are no images at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"training folder '{root}' does not exist or is not a folder")
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    subsets: list[Subset] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _FOLDER.match(folder.name)
        if match is None or int(match.group(1)) < 1:
            raise DatasetError(
                f"training subfolder '{folder.name}' in '{root}' has no repeat prefix: name it like "
                f"'10_{folder.name}' (10 repeats per epoch, then the caption for images without a "
                f"{ext} file)"
            )
        subset = Subset(folder.name, int(match.group(1)))
        class_caption = match.group(2).strip()
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
            subset.samples.append(Sample(image, _caption(image, ext, class_caption), folder.name))
        subsets.append(subset)
    dataset = Dataset(root, [s for s in subsets if s.samples])
    if not dataset.samples:
        found = ", ".join(s.name for s in subsets) or "no subfolders"
        raise DatasetError(
            f"training folder '{root}' holds no images ({found}); put .png/.jpg/.jpeg/.webp/.bmp files "
            "in subfolders named like '10_mychar woman'"
        )
    return dataset


def _caption(image: Path, ext: str, fallback: str) -> str:
    path = image.with_suffix(ext)
    if not path.is_file():
        return fallback
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"caption file '{path}' cannot be read as UTF-8 text ({exc})") from exc
    # kohya uses the first non-empty line of a caption file
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else fallback


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """`[3, R, R]` float32 in [-1, 1]: short side resized to R (Lanczos), then centre cropped.

    Raises:
        DatasetError: naming the file when it cannot be read as an image.
    """
    try:
        with open_checked(path, str(path), frames=False) as img:
            img.load()
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(f"image '{path}' cannot be read ({exc}); replace or remove it") from exc
    width, height = rgb.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def check_resolution(resolution: int) -> None:
    if resolution < 64 or resolution % 8:
        raise DatasetError(f"resolution {resolution} must be a multiple of 8 and at least 64")
