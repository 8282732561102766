"""Latent resizing, batch repeats and the `.latent` file format (comfy/utils.py `common_upscale`,
`bislerp`, `repeat_to_batch_size`; nodes.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")
LATENT_FORMAT_KEY = "latent_format_version_0"


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """comfy.utils.repeat_to_batch_size: cut or tile along the batch to `batch_size`."""
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = [math.ceil(batch_size / tensor.shape[0])] + [1] * (tensor.ndim - 1)
        return tensor.repeat(reps)[:batch_size]
    return tensor


def center_crop(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop [..., H, W] around the centre to the aspect ratio of width x height (common_upscale's crop)."""
    old_w, old_h = samples.shape[-1], samples.shape[-2]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """Resize [B,C,H,W] to (height, width), optionally centre-cropping to the target aspect first."""
    if crop == "center":
        samples = center_crop(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    resized: torch.Tensor = torch.nn.functional.interpolate(samples, size=(height, width), mode=method)
    return resized


def _slerp(b1: torch.Tensor, b2: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of flat [N,C] batches by ratios [N,1], with norms interpolated linearly."""
    c = b1.shape[-1]
    b1_norms = torch.norm(b1, dim=-1, keepdim=True)
    b2_norms = torch.norm(b2, dim=-1, keepdim=True)
    b1_n = b1 / b1_norms
    b2_n = b2 / b2_norms
    b1_n[b1_norms.expand(-1, c) == 0.0] = 0.0
    b2_n[b2_norms.expand(-1, c) == 0.0] = 0.0
    dot = (b1_n * b2_n).sum(1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    res: torch.Tensor = (torch.sin((1.0 - r.squeeze(1)) * omega) / so).unsqueeze(1) * b1_n
    res = res + (torch.sin(r.squeeze(1) * omega) / so).unsqueeze(1) * b2_n
    res *= (b1_norms * (1.0 - r) + b2_norms * r).expand(-1, c)
    # same or opposite directions: plain copy or linear interpolation
    res[dot > 1 - 1e-5] = b1[dot > 1 - 1e-5]
    res[dot < 1e-5 - 1] = (b1 * (1.0 - r) + b2 * r)[dot < 1e-5 - 1]
    return res


def _bilinear_data(old: int, new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coords_1 = torch.arange(old, dtype=torch.float32).reshape((1, 1, 1, -1))
    coords_1 = torch.nn.functional.interpolate(coords_1, size=(1, new), mode="bilinear")
    ratios = coords_1 - coords_1.floor()
    coords_2 = torch.arange(old, dtype=torch.float32).reshape((1, 1, 1, -1)) + 1
    coords_2[:, :, :, -1] -= 1
    coords_2 = torch.nn.functional.interpolate(coords_2, size=(1, new), mode="bilinear")
    return ratios, coords_1.to(torch.int64), coords_2.to(torch.int64)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's bislerp: bilinear placement, spherical blending of channel vectors (width, then height)."""
    dtype = samples.dtype
    samples = samples.float()
    n, c, h, w = samples.shape
    ratios, c1, c2 = _bilinear_data(w, width)
    c1, c2 = c1.expand((n, c, h, -1)), c2.expand((n, c, h, -1))
    ratios = ratios.expand((n, 1, h, -1)).movedim(1, -1).reshape((-1, 1))
    pass_1 = samples.gather(-1, c1).movedim(1, -1).reshape((-1, c))
    pass_2 = samples.gather(-1, c2).movedim(1, -1).reshape((-1, c))
    result = _slerp(pass_1, pass_2, ratios).reshape(n, h, width, c).movedim(-1, 1)

    ratios, c1, c2 = _bilinear_data(h, height)
    c1 = c1.reshape((1, 1, -1, 1)).expand((n, c, -1, width))
    c2 = c2.reshape((1, 1, -1, 1)).expand((n, c, -1, width))
    ratios = ratios.reshape((1, 1, -1, 1)).expand((n, 1, -1, width)).movedim(1, -1).reshape((-1, 1))
    pass_1 = result.gather(-2, c1).movedim(1, -1).reshape((-1, c))
    pass_2 = result.gather(-2, c2).movedim(1, -1).reshape((-1, c))
    result = _slerp(pass_1, pass_2, ratios).reshape(n, height, width, c).movedim(-1, 1)
    return result.to(dtype)


def save_latent_file(path: Path, samples: torch.Tensor, metadata: Mapping[str, Any] | None) -> None:
    """ComfyUI's SaveLatent file: `latent_tensor` plus the empty `latent_format_version_0` marker."""
    tensors = {"latent_tensor": samples.contiguous(), LATENT_FORMAT_KEY: torch.tensor([])}
    text = (
        None
        if metadata is None
        else {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    )
    save_file(tensors, str(path), metadata=text)


def load_latent_file(path: Path) -> torch.Tensor:
    """Read a `.latent` file; files without the version marker are in model space (x 0.18215)."""
    data = load_file(str(path), device="cpu")
    if "latent_tensor" not in data:
        raise ValueError(f"{path.name} is not a latent file: it has no 'latent_tensor'")
    multiplier = 1.0 if LATENT_FORMAT_KEY in data else 1.0 / 0.18215
    return data["latent_tensor"].float() * multiplier
