"""VAE latents of the training images: kept in memory, optionally in `.npz` files beside them.

Without `cache_latents` the posterior's (mean, std) is kept and a fresh sample is drawn every step
(kohya without caching). With it, one sample per image (and one of the flipped image with
`flip_aug`) is drawn once and reused, as kohya's cache; `cache_latents_to_disk` writes it to
`<image>.nodegraph.npz` with the image's size and modification time, its bucket and a fingerprint
of the VAE, and a later run reuses the file only while all of these still match.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nodes.train.buckets import Size, load_pixels
from nodes.train.dataset import Sample

CACHE_SUFFIX = ".nodegraph.npz"


class LatentCache:
    """Encodes each image once per bucket and flip; see the module docstring."""

    def __init__(
        self, vae: Any, device: torch.device, options: Any, placement: dict[Sample, tuple[Size, Size]]
    ):
        self.vae, self.device, self.placement = vae, device, placement
        self.cache, self.to_disk, self.flip = (
            options.cache_latents,
            options.cache_latents_to_disk,
            options.flip_aug,
        )
        self.cache = self.cache or self.to_disk  # kohya: to_disk implies caching
        self._moments: dict[tuple[Path, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._fixed: dict[tuple[Path, bool], torch.Tensor] = {}
        self._generator = torch.Generator("cpu").manual_seed(options.seed + 2)
        self._vae_print: str | None = None
        self.reused = 0  # images whose latents came from a disk cache

    def moments(self, sample: Sample, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of the image in its bucket, `[4, h, w]`."""
        key = (sample.image, flipped)
        found = self._moments.get(key)
        if found is None:
            reso, resized = self.placement[sample]
            pixels = load_pixels(sample, reso, resized)
            if flipped:
                pixels = pixels.flip(-1)
            with torch.no_grad():
                h = self.vae.encoder(pixels[None].to(self.device, next(self.vae.parameters()).dtype))
                if getattr(self.vae, "quant_conv", None) is not None:
                    h = self.vae.quant_conv(h)
                mean, logvar = torch.chunk(h.float(), 2, dim=1)
                std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
            found = (mean[0], std[0])
            self._moments[key] = found
        return found

    def prepare(self, sample: Sample, generator: torch.Generator) -> None:
        """Encode (or read from disk) before training; a corrupt image fails here."""
        flips = (False, True) if self.flip else (False,)
        if not self.cache:
            for flipped in flips:
                self.moments(sample, flipped)
            return
        if self.to_disk and self._read(sample, flips):
            self.reused += 1
            return
        for flipped in flips:
            mean, std = self.moments(sample, flipped)
            eps = torch.randn(mean.shape, generator=self._generator).to(self.device)
            self._fixed[(sample.image, flipped)] = mean + std * eps
            del self._moments[(sample.image, flipped)]  # the sample is all a cached run needs
        if self.to_disk:
            self._write(sample, flips)

    def latents(self, samples: list[Sample], flips: list[bool], generator: torch.Generator) -> torch.Tensor:
        """Unscaled latents `[B, 4, h, w]`: the cached ones, or a fresh posterior sample."""
        if self.cache:
            return torch.stack([self._fixed[(s.image, f)] for s, f in zip(samples, flips, strict=True)])
        means, stds = zip(*(self.moments(s, f) for s, f in zip(samples, flips, strict=True)), strict=True)
        mean, std = torch.stack(means), torch.stack(stds)
        eps = torch.randn(mean.shape, generator=generator).to(self.device)
        return mean + std * eps

    # ---------------------------------------------------------------- disk

    def _stamp(self, sample: Sample) -> np.ndarray:
        st = sample.image.stat()
        reso, resized = self.placement[sample]
        return np.array([st.st_size, st.st_mtime_ns, *reso, *resized], dtype=np.int64)

    def _vae_fingerprint(self) -> str:
        if self._vae_print is None:
            weight = next(self.vae.parameters()).detach().float().cpu().numpy()
            self._vae_print = hashlib.sha256(weight.tobytes()).hexdigest()[:16]
        return self._vae_print

    def _read(self, sample: Sample, flips: tuple[bool, ...]) -> bool:
        path = cache_path(sample.image)
        try:
            with np.load(path) as data:
                if (
                    not np.array_equal(data["stamp"], self._stamp(sample))
                    or str(data["vae"]) != self._vae_fingerprint()
                ):
                    return False
                arrays = {f: data["latents_flipped" if f else "latents"] for f in flips}
        except (OSError, KeyError, ValueError):
            return False
        for flipped, array in arrays.items():
            self._fixed[(sample.image, flipped)] = torch.from_numpy(np.array(array)).to(self.device)
        return True

    def _write(self, sample: Sample, flips: tuple[bool, ...]) -> None:
        path = cache_path(sample.image)
        arrays = {
            "latents_flipped" if f else "latents": self._fixed[(sample.image, f)].cpu().numpy() for f in flips
        }
        partial = path.with_name(f".{path.name}.partial")
        try:
            with partial.open("wb") as fh:
                np.savez(fh, stamp=self._stamp(sample), vae=np.array(self._vae_fingerprint()), **arrays)  # type: ignore[arg-type]
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def cache_path(image: Path) -> Path:
    return image.with_name(image.stem + CACHE_SUFFIX)
