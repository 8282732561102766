"""Aspect-ratio buckets as kohya's `BucketManager` (`library/train_util.py`, `model_util.py`) makes them.

Each image goes to the predefined bucket (W×H, sides multiples of `steps`, area ≤ the training
area) whose aspect ratio is nearest its own; it is resized to cover the bucket keeping its aspect
ratio (an area filter when shrinking, Lanczos when enlarging, as kohya's `resize_image`) and only
the rounding remainder is cropped from the centre. A batch holds images of one bucket only.
With buckets off there is one bucket, the training size, and images are resized to cover it and
centre-cropped.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from nodes.train.dataset import Sample, open_rgb

Size = tuple[int, int]


def bucket_resolutions(
    max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[Size]:
    """kohya's `make_bucket_resolutions`: sorted (W, H) of area at most W*H of `max_reso`."""
    max_area = max_reso[0] * max_reso[1]
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted((int(w), int(h)) for w, h in resos)


@dataclass
class Buckets:
    """kohya's bucket choice for every image of a run (`select_bucket`, `make_buckets`)."""

    max_reso: Size
    enabled: bool = True
    min_size: int = 256
    max_size: int = 1024
    steps: int = 64
    no_upscale: bool = False

    def __post_init__(self) -> None:
        if not self.enabled:
            self.predefined = [self.max_reso]
        elif not self.no_upscale:
            self.predefined = bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.steps)
        else:
            self.predefined = []
        self.ratios = np.array([w / h for w, h in self.predefined]) if self.predefined else np.zeros(0)

    def select(self, width: int, height: int) -> tuple[Size, Size, float]:
        """(bucket (W, H), resized size, aspect-ratio error) for an image of that size."""
        aspect = width / height
        if not self.enabled or not self.no_upscale:
            if self.enabled and (width, height) in self.predefined:
                reso: Size = (width, height)
            else:
                reso = self.predefined[int(np.abs(self.ratios - aspect).argmin())]
            scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            resized = self._no_upscale_size(width, height, aspect)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return reso, resized, reso[0] / reso[1] - aspect

    def _no_upscale_size(self, width: int, height: int, aspect: float) -> Size:
        max_area = self.max_reso[0] * self.max_reso[1]
        if width * height <= max_area:
            return (width, height)
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        bw = self._round(rw)
        bh_w = self._round(bw / aspect)
        bh = self._round(rh)
        bw_h = self._round(bh * aspect)
        if abs(bw / bh_w - aspect) < abs(bw_h / bh - aspect):
            return (bw, int(bw / aspect + 0.5))
        return (int(bh * aspect + 0.5), bh)

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps


def assign(items: list[tuple[Sample, int]], buckets: Buckets) -> dict[Sample, tuple[Size, Size]]:
    """Each sample's (bucket, resized size)."""
    return {s: buckets.select(*s.size)[:2] for s, _ in items}


def bucket_info(items: list[tuple[Sample, int]], buckets: Buckets) -> dict[str, object] | None:
    """kohya's `ss_bucket_info` (None with buckets off): counts include repeats, resolutions sorted."""
    if not buckets.enabled:
        return None
    counts: dict[Size, int] = {}
    errors = []
    for sample, repeats in items:
        reso, _, error = buckets.select(*sample.size)
        counts[reso] = counts.get(reso, 0) + repeats
        errors.append(abs(error))
    info: dict[str, object] = {
        "buckets": {i: {"resolution": reso, "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
    }
    info["mean_img_ar_error"] = float(np.mean(errors)) if errors else 0
    return info


def bucket_info_json(items: list[tuple[Sample, int]], buckets: Buckets) -> str:
    return json.dumps(bucket_info(items, buckets))


def epoch_batches(
    items: list[tuple[Sample, int]],
    placement: dict[Sample, tuple[Size, Size]],
    batch_size: int,
    rng: random.Random,
) -> list[list[Sample]]:
    """One epoch: every image `repeats` times, grouped by bucket, shuffled, cut into batches."""
    by_bucket: dict[Size, list[Sample]] = {}
    for sample, repeats in items:
        by_bucket.setdefault(placement[sample][0], []).extend([sample] * repeats)
    batches: list[list[Sample]] = []
    for reso in sorted(by_bucket):
        bucket = by_bucket[reso]
        rng.shuffle(bucket)
        batches += [bucket[i : i + batch_size] for i in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(items: list[tuple[Sample, int]], buckets: Buckets, batch_size: int) -> int:
    """kohya's `len(train_dataloader)`: per bucket ceil(images with repeats / batch size)."""
    counts: dict[Size, int] = {}
    for sample, repeats in items:
        reso = buckets.select(*sample.size)[0]
        counts[reso] = counts.get(reso, 0) + repeats
    return sum(math.ceil(n / batch_size) for n in counts.values())


def load_pixels(sample: Sample, reso: Size, resized: Size) -> torch.Tensor:
    """`[3, H, W]` float32 in [-1, 1]: resized keeping the aspect ratio, the remainder centre-cropped."""
    rgb = open_rgb(sample.image)
    if rgb.size != resized:
        shrink = rgb.size[0] > resized[0] and rgb.size[1] > resized[1]
        rgb = rgb.resize(resized, Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)
    left, top = (resized[0] - reso[0]) // 2, (resized[1] - reso[1]) // 2
    rgb = rgb.crop((left, top, left + reso[0], top + reso[1]))
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
