"""Textual-inversion embeddings (`embedding:name` in a prompt), found and read as ComfyUI does.

Looked up in every embeddings directory: the exact name, then `name.safetensors`, `.pt`, `.bin`
(a name may include a sub-folder; it may never leave the directory). Formats: A1111 `.pt`
(`string_to_param`), SDXL-style `clip_l` / `clip_g` (per encoder), safetensors `emb_params`, else
the first tensor.
Pickles are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EXTENSIONS = (".safetensors", ".pt", ".bin")
EMBEDDING_KEY = "clip_l"

_cache: dict[tuple[str, int, int, str], torch.Tensor] = {}
_lock = threading.Lock()


class EmbeddingError(ValueError):
    """An embedding file exists but cannot be read."""


def find_embedding_file(name: str, dirs: Sequence[Path]) -> Path | None:
    """The file for `name` in the first directory holding it, or None (a name leaving its directory: None)."""
    if not name or "\0" in name:
        return None
    for directory in dirs:
        base = os.path.abspath(directory)
        candidate = os.path.abspath(os.path.join(base, name))
        try:
            if os.path.commonpath((base, candidate)) != base:
                continue
        except ValueError:
            continue
        if os.path.isfile(candidate):
            return Path(candidate)
        for ext in EXTENSIONS:
            if os.path.isfile(candidate + ext):
                return Path(candidate + ext)
    return None


def load_embedding(path: Path, embed_key: str = EMBEDDING_KEY) -> torch.Tensor:
    """The vectors of an embedding file as a float32 `[n, width]` tensor (cached by file identity).

    `embed_key` picks the encoder's tensor in an SDXL file (`clip_l` for CLIP-L, `clip_g` for bigG).
    """
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size, embed_key)
    with _lock:
        if key in _cache:
            return _cache[key]
    vectors = _extract(_read(path), path, embed_key)
    vectors = vectors.detach().to(torch.float32)
    if vectors.ndim == 1:
        vectors = vectors.reshape(1, -1)
    if vectors.ndim != 2:
        raise EmbeddingError(
            f"embedding '{path.name}' has vectors of shape {tuple(vectors.shape)}, expected [n, width]"
        )
    with _lock:
        _cache[key] = vectors
    return vectors


def _read(path: Path) -> Any:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure is the same to the user: this file is unusable
        raise EmbeddingError(
            f"embedding '{path.name}' cannot be read ({type(exc).__name__}: {exc}); nodegraph only reads "
            "safetensors and weights-only .pt files"
        ) from exc


def _extract(data: Any, path: Path, embed_key: str = EMBEDDING_KEY) -> torch.Tensor:
    if isinstance(data, dict):
        if "string_to_param" in data and isinstance(data["string_to_param"], dict):
            first: torch.Tensor = next(iter(data["string_to_param"].values()))
            return first
        if embed_key in data and isinstance(data[embed_key], torch.Tensor):
            return data[embed_key]  # type: ignore[no-any-return]
        if "emb_params" in data and isinstance(data["emb_params"], torch.Tensor):
            return data["emb_params"]
        bundled = [
            v for k, v in data.items() if str(k).startswith("bundle_emb.") and isinstance(v, torch.Tensor)
        ]
        if bundled:
            return bundled[0]
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if tensors:
            return tensors[0]
    if isinstance(data, list):
        tensors = [
            v for item in data if isinstance(item, dict) for v in item.values() if isinstance(v, torch.Tensor)
        ]
        if tensors:
            return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])
    if isinstance(data, torch.Tensor):
        return data
    raise EmbeddingError(f"embedding '{path.name}' holds no tensor nodegraph recognises")
