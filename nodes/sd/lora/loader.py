"""Reading LoRA files (once, into a bounded cache), decoding them against a model, and the coverage report.

`read_lora` keeps each file's tensors; `decoded` turns them into per-parameter updates for one
module (UNet or text encoder), also cached, so a strength change never re-reads or re-decodes a
file; `coverage` says how many modules matched, which keys did not, and the LoRA's family.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from nodegraph.primitives import LruCache, file_stamp
from nodes.sd.lora import family as families
from nodes.sd.lora.formats import FormatError, Update, bias_update, used_parts, weight_update
from nodes.sd.lora.keymap import te_stems, unet_stems
from nodes.sd.lora.suffixes import split_key

# "unet"; "te" a CLIP-L (SD1.x, SDXL's first encoder); "te2" SDXL's bigG; "te_g" a bigG alone (refiner)
Target = Literal["unet", "te", "te2", "te_g"]
V = TypeVar("V")
TE_PREFIXES = ("lora_te", "text_encoder", "lora_prior_te")


class LoraFileError(ValueError):
    """A LoRA file cannot be read, or holds no tensors."""


@dataclass
class LoraFile:
    """A LoRA file's tensors grouped by module stem, its metadata and its family."""

    path: Path
    stamp: tuple[int, int]
    groups: dict[str, dict[str, torch.Tensor]]
    unknown_keys: list[str]
    metadata: dict[str, str]
    family: str
    family_source: str
    nbytes: int
    key_family: str | None = None  # what the key names and shapes alone say


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 - safe_open has no iter
        # A1111-era .pt/.ckpt LoRAs: weights only, never arbitrary pickled code.
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user-facing problem
        raise LoraFileError(f"cannot read LoRA file {path.name}: {exc}; is it a complete LoRA file?") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraFileError(f"LoRA file {path.name} holds no tensor dictionary")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def _parse(path: Path, stamp: tuple[int, int]) -> LoraFile:
    tensors, meta = _load_tensors(path)
    if not tensors:
        raise LoraFileError(f"LoRA file {path.name} holds no tensors")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    family, source = families.detect(meta, shapes)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    key_family = families.from_keys(shapes)
    return LoraFile(path, stamp, groups, sorted(unknown), meta, family, source, nbytes, key_family)


_FILES: LruCache[Hashable, LoraFile] = LruCache(max_bytes=1 << 30, size=lambda f: f.nbytes)


def read_lora(path: Path, stamp: tuple[int, int] | None = None) -> LoraFile:
    """The parsed file, read once per (path, stamp) and kept in a bounded cache."""
    stamp = stamp or file_stamp(path)
    return _FILES.get_or_make((str(path), stamp), lambda: _parse(path, stamp))


# --------------------------------------------------------------------------------------------
# Decoding against one module


@dataclass
class Decoded:
    """One LoRA's updates for one module: parameter name -> update, plus what did not fit."""

    target: Target
    updates: dict[str, Update]
    modules: int  # module stems that produced an update
    matched: set[str] = field(default_factory=set)  # file stems that name a module of this model
    failed: dict[str, str] = field(default_factory=dict)  # stem -> why it could not apply
    unused: list[str] = field(default_factory=list)  # file keys of matched stems no format uses

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.updates.values())


_STEMS: weakref.WeakKeyDictionary[Any, dict[Target, tuple[int, dict[str, str]]]] = weakref.WeakKeyDictionary()
_DECODED: LruCache[Hashable, Decoded] = LruCache(max_bytes=2 << 30, size=lambda d: d.nbytes)


def _stems_of(module: Any, target: Target) -> tuple[int, dict[str, str]]:
    """(structure signature, stem map) of a module as `target`, computed once per module and target."""
    per_target = _STEMS.setdefault(module, {})
    found = per_target.get(target)
    if found is None:
        sig = hash((target, tuple((n, tuple(p.shape)) for n, p in module.named_parameters())))
        found = (sig, unet_stems(module) if target == "unet" else te_stems(module, target))
        per_target[target] = found
    return found


def _decode(lora: LoraFile, module: Any, target: Target, stems: dict[str, str]) -> Decoded:
    params = dict(module.named_parameters())
    out = Decoded(target, {}, 0)
    for stem, parts in lora.groups.items():
        path = stems.get(stem)
        if path is None:
            continue
        out.matched.add(stem)
        weight, bias = params.get(path + ".weight"), params.get(path + ".bias")
        try:
            upd = weight_update(parts, weight.shape) if weight is not None else None
            bupd = bias_update(parts, bias.shape) if bias is not None else None
        except (FormatError, RuntimeError, KeyError) as exc:
            out.failed[stem] = str(exc)
            continue
        if upd is None and bupd is None:
            out.failed[stem] = f"no adapter tensors among {sorted(parts)}"
            continue
        if path + ".weight" in out.updates or path + ".bias" in out.updates:
            out.failed[stem] = f"names {path} again, which another key of the file already patches"
            continue
        if upd is not None:
            out.updates[path + ".weight"] = upd
        if bupd is not None:
            out.updates[path + ".bias"] = bupd
        out.modules += 1
        out.unused += [f"{stem}.{p}" for p in sorted(set(parts) - used_parts(parts))]
    return out


def decoded(path: Path, stamp: tuple[int, int], module: Any, target: Target) -> Decoded:
    """The updates of one LoRA file for `module` (a diffusers UNet or a CLIP text encoder), cached."""
    sig, stems = _stems_of(module, target)
    key = (str(path), stamp, target, sig)

    def make() -> Decoded:
        with torch.inference_mode(False), torch.no_grad():
            return _decode(read_lora(path, stamp), module, target, stems)

    return _DECODED.get_or_make(key, make)


def clear_caches() -> None:
    """Forget every read and decoded LoRA (tests, and `free memory`)."""
    _FILES.clear()
    _DECODED.clear()
