"""SDXL text-encoder outputs kept in `<image>_te_outputs.npz` files, as kohya's
`--cache_text_encoder_outputs_to_disk` (`strategy_sdxl.SdxlTextEncoderOutputsCachingStrategy`).

A file holds kohya's three arrays for the image's caption: `hidden_state1` (CLIP-L's penultimate
layer, `[75n+2, 768]`), `hidden_state2` (bigG's, `[75n+2, 1280]`) and `pool2` (bigG's projected
pooled output, `[1280]`), so kohya reads nodegraph's files and the other way round. kohya reuses a
file whenever the three arrays are there, even after the caption or the checkpoint changed;
nodegraph also writes the caption and a fingerprint of both text encoders (`caption`,
`te_fingerprint`: kohya ignores extra arrays) and reuses a file only while both still match and the
shapes fit `--max_token_length`. A file without them (written by kohya) is encoded again and
rewritten once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

SUFFIX = "_te_outputs.npz"  # kohya's SDXL_TEXT_ENCODER_OUTPUTS_NPZ_SUFFIX
CLIP_L_WIDTH = 768

Text = tuple[torch.Tensor, torch.Tensor]  # (hidden `[75n+2, 2048]`, pooled `[1280]`)


def cache_path(image: Path) -> Path:
    """kohya's `os.path.splitext(image_abs_path)[0] + "_te_outputs.npz"`."""
    return image.with_name(image.stem + SUFFIX)


def fingerprint(*encoders: Any) -> str:
    """A short hash of the first and last weights of each text encoder."""
    digest = hashlib.sha256()
    for te in encoders:
        params = list(te.parameters())
        for p in (params[0], params[-1]):
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def read(path: Path, caption: str, te_print: str, tokens: int, device: torch.device) -> Text | None:
    """The cached outputs when the file is whole and was made from this caption and these encoders."""
    try:
        with np.load(path) as data:
            if "caption" not in data or "te_fingerprint" not in data:
                return None  # kohya's own file: nothing says which caption or model made it
            if str(data["caption"]) != caption or str(data["te_fingerprint"]) != te_print:
                return None
            h1, h2, pool = (np.array(data[k]) for k in ("hidden_state1", "hidden_state2", "pool2"))
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if h1.shape != (tokens, CLIP_L_WIDTH) or h2.ndim != 2 or h2.shape[0] != tokens or pool.ndim != 1:
        return None
    hidden = torch.cat([torch.from_numpy(h1).float(), torch.from_numpy(h2).float()], dim=-1)
    return hidden.to(device), torch.from_numpy(pool).float().to(device)


def write(path: Path, outputs: Text, caption: str, te_print: str) -> None:
    """kohya's arrays (float32) plus the caption and fingerprint, renamed into place whole."""
    hidden, pooled = (t.detach().float().cpu().numpy() for t in outputs)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("wb") as fh:
            np.savez(
                fh,
                hidden_state1=hidden[:, :CLIP_L_WIDTH],
                hidden_state2=hidden[:, CLIP_L_WIDTH:],
                pool2=pooled,
                caption=np.array(caption),
                te_fingerprint=np.array(te_print),
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
