"""Per-format LoRA math: a file's tensors for one module -> the update of each patched parameter.

Every format becomes one of three update kinds, applied to an fp32 running weight `W` at strength
`s` (ComfyUI's `calculate_weight`, with the two corrections of the oracle README):

* `LowRank(up, down, scale)`: `W += (s·scale) · (up @ down)`, kept factored so a strength change
  costs one rank-r product (kohya LoRA/LoCon, PEFT, diffusers, old attn-procs).
* `Dense(delta, scale)`: `W += (s·scale) · delta` (LoHa, LoKr, LoCon with `lora_mid`, full/diff).
* `Dora(inner, dora_scale)`: weight decomposition around another update, `W + s·(W_dora − W)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

DORA_EPS = float(torch.finfo(torch.float32).eps)


class FormatError(ValueError):
    """A module's tensors do not form a known adapter, or do not fit the target weight."""


class Update(Protocol):
    """One patch of one parameter."""

    def apply(self, weight: torch.Tensor, strength: float) -> None:
        """Apply in place to the fp32 running weight."""

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW at strength 1 (for tests and CheckpointSave), given the running weight."""

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class LowRank:
    """`(s·scale) · up @ down`, reshaped to the weight; up `[out, r]`, down `[r, in·kh·kw]`, fp32."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float

    def apply(self, weight: torch.Tensor, strength: float) -> None:
        # addmm_ writes the product straight into the weight: no full-size temporary.
        weight.view(weight.shape[0], -1).addmm_(self.up, self.down, alpha=strength * self.scale)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.scale * (self.up @ self.down)).reshape(weight.shape)

    @property
    def nbytes(self) -> int:
        return (self.up.numel() + self.down.numel()) * 4


@dataclass(frozen=True)
class Dense:
    """`(s·scale) · delta` with a full-size fp32 delta."""

    raw: torch.Tensor
    scale: float

    def apply(self, weight: torch.Tensor, strength: float) -> None:
        weight.add_(self.raw.reshape(weight.shape), alpha=strength * self.scale)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.raw).reshape(weight.shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel() * 4


@dataclass(frozen=True)
class Dora:
    """DoRA: `Wc = W + ΔW`, `W_dora = Wc · m / (‖Wc‖ + eps)`, then `W + s·(W_dora − W)`.

    The norm is taken per output row when `dora_scale` is `[out, 1, …]` and per input column
    otherwise, always of the patched `Wc` (LyCORIS/PEFT; ComfyUI uses the unpatched W on the
    output axis, which the oracle README records as its bug).
    """

    inner: LowRank | Dense
    dora_scale: torch.Tensor

    def apply(self, weight: torch.Tensor, strength: float) -> None:
        calc = weight + self.inner.delta(weight)
        if self.dora_scale.shape[0] == weight.shape[0]:
            norm = calc.reshape(calc.shape[0], -1).norm(dim=1, keepdim=True)
            norm = norm.reshape(calc.shape[0], *[1] * (calc.dim() - 1))
        else:
            cols = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
            norm = cols.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
        calc *= self.dora_scale / (norm + DORA_EPS)
        if strength == 1.0:
            weight.copy_(calc)
        else:
            calc -= weight
            weight.add_(calc, alpha=strength)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.clone()
        self.apply(w, 1.0)
        return w - weight

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.dora_scale.numel() * 4


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _scale(parts: Mapping[str, torch.Tensor], rank: int | None) -> float:
    alpha = parts.get("alpha")
    if alpha is None or rank is None:
        return 1.0
    return float(alpha.float().item()) / rank


def _tucker(core: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # LyCORIS's CP/Tucker rebuild; contiguous so torch.kron accepts it (ComfyUI's LoKr bug).
    return torch.einsum("ijkl,jr,ip->prkl", _f32(core), _f32(b), _f32(a)).contiguous()


def _lora(parts: Mapping[str, torch.Tensor], shape: torch.Size) -> LowRank | Dense:
    up, down = _f32(parts["up"]), _f32(parts["down"])
    rank = down.shape[0]
    scale = _scale(parts, rank)
    if "mid" in parts:
        delta = torch.einsum("ijyx,oi,jc->ocyx", _f32(parts["mid"]), up.flatten(1), down.flatten(1))
        return Dense(delta.contiguous(), scale)
    up2, down2 = up.flatten(1), down.flatten(1)
    if up2.shape[1] != down2.shape[0] or up2.shape[0] * down2.shape[1] != shape.numel():
        raise FormatError(
            f"LoRA up {tuple(up.shape)} @ down {tuple(down.shape)} does not give {tuple(shape)}"
        )
    return LowRank(up2.contiguous(), down2.contiguous(), scale)


def _loha(parts: Mapping[str, torch.Tensor]) -> Dense:
    rank = parts["hada_w1_b"].shape[0]
    if "hada_t1" in parts and "hada_t2" in parts:
        w1 = _tucker(parts["hada_t1"], parts["hada_w1_b"], parts["hada_w1_a"])
        w2 = _tucker(parts["hada_t2"], parts["hada_w2_b"], parts["hada_w2_a"])
    else:
        w1 = _f32(parts["hada_w1_a"]) @ _f32(parts["hada_w1_b"])
        w2 = _f32(parts["hada_w2_a"]) @ _f32(parts["hada_w2_b"])
    return Dense((w1 * w2).contiguous(), _scale(parts, rank))


def _lokr(parts: Mapping[str, torch.Tensor]) -> Dense:
    rank: int | None = None
    if "lokr_w1" in parts:
        w1 = _f32(parts["lokr_w1"])
    else:
        rank = parts["lokr_w1_b"].shape[0]
        w1 = _f32(parts["lokr_w1_a"]) @ _f32(parts["lokr_w1_b"])
    if "lokr_w2" in parts:
        w2 = _f32(parts["lokr_w2"])
    else:
        rank = parts["lokr_w2_b"].shape[0]  # the rank of w2 wins when both are decomposed
        if "lokr_t2" in parts:
            w2 = _tucker(parts["lokr_t2"], parts["lokr_w2_b"], parts["lokr_w2_a"])
        else:
            w2 = _f32(parts["lokr_w2_a"]) @ _f32(parts["lokr_w2_b"])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return Dense(torch.kron(w1.contiguous(), w2.contiguous()), _scale(parts, rank))


def _check_numel(update: LowRank | Dense, shape: torch.Size) -> None:
    if isinstance(update, Dense) and update.raw.numel() != shape.numel():
        raise FormatError(f"update of shape {tuple(update.raw.shape)} does not fit weight {tuple(shape)}")


def weight_update(parts: Mapping[str, torch.Tensor], shape: torch.Size) -> Update | None:
    """The weight update of one module's tensors, or None when they hold no weight adapter."""
    inner: LowRank | Dense
    if "up" in parts and "down" in parts:
        inner = _lora(parts, shape)
    elif "hada_w1_a" in parts:
        inner = _loha(parts)
    elif any(k.startswith("lokr_") for k in parts):
        inner = _lokr(parts)
    elif "diff" in parts:
        inner = Dense(_f32(parts["diff"]), 1.0)
    elif "w_norm" in parts:
        inner = Dense(_f32(parts["w_norm"]), 1.0)
    else:
        return None
    _check_numel(inner, shape)
    if "dora_scale" in parts and "diff" not in parts and "w_norm" not in parts:
        return Dora(inner, _f32(parts["dora_scale"]))
    return inner


def bias_update(parts: Mapping[str, torch.Tensor], shape: torch.Size) -> Dense | None:
    """The bias update (`diff_b` of LyCORIS full, `b_norm` of train_norm), if any."""
    raw = parts.get("diff_b", parts.get("b_norm"))
    if raw is None:
        return None
    update = Dense(_f32(raw), 1.0)
    _check_numel(update, shape)
    return update


def used_parts(parts: Mapping[str, torch.Tensor]) -> set[str]:
    """The parts a known adapter consumes (the rest of a module's keys are reported unused)."""
    known = {"up", "down", "mid", "alpha", "dora_scale", "diff", "diff_b", "w_norm", "b_norm"}
    known |= {k for k in parts if k.startswith(("hada_", "lokr_"))}
    return known & set(parts)
