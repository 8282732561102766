"""Model merging as patches on shared weights: ComfyUI's `add_patches` + `calculate_weight` "diff".

Sources: comfy_extras/nodes_model_merging.py (every merge node clones model1 and patches each
weight with model2's: `add_patches({k: W2}, strength_patch, strength_model)`) and comfy/lora.py
`calculate_weight`. A merge is one `MergeRef` in a handle's patch list, beside its LoRAs and in
node order; the patcher (`nodes.sd.patcher`) applies it inside the consumer like a LoRA, so a
merged model costs no copy of either model until it is sampled, and CheckpointSave reads the
merged weights. Per parameter, in fp32:

    W ← W · strength_model   (only when strength_model ≠ 1)
    W ← W + strength_patch · W2

W2 is model2's weight as model2 computes it: its base weight with its own patches (LoRAs, earlier
merges) applied first, as ComfyUI's recursive `calculate_weight` does. A parameter whose shape
differs between the models is left alone (ComfyUI warns and skips it).
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from nodes.sd.lora.ldm_export import UNET_PREFIX, ExportError, unet_key

Target = Literal["unet", "te"]

# CLIPMerge* skip these keys (ComfyUI: "position_ids" and "logit_scale" are not merged)
CLIP_SKIPPED = (".position_ids", ".logit_scale")

_SERIAL: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_COUNTER = itertools.count(1)


def _serial(module: Any) -> int:
    """A number that names one loaded module for as long as it lives (ids may be reused)."""
    found = _SERIAL.get(module)
    if found is None:
        found = _SERIAL[module] = next(_COUNTER)
    return found


@dataclass(frozen=True)
class MergeUpdate:
    """One parameter's merge patch (a patcher `Update`)."""

    other: MergeRef
    name: str
    strength_patch: float
    strength_model: float

    def apply(self, weight: torch.Tensor, strength: float) -> None:
        if self.strength_model != 1.0:
            weight *= self.strength_model
        if self.strength_patch != 0.0:
            weight += self.strength_patch * self.other.other_weight(self.name, weight.device)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        merged = weight.clone()
        self.apply(merged, 1.0)
        return merged - weight

    @property
    def nbytes(self) -> int:
        return 0  # nothing is held: model2's weights are read when the patch is applied


@dataclass(frozen=True, eq=False)
class MergeRef:
    """One merge node's patch of every parameter of a module (UNet or text encoder) by model2's.

    `ratios` are (key prefix, ratio) in the node's input order: a parameter takes the ratio of the
    longest prefix of its original-LDM UNet key (without `model.diffusion_model.`), else the first
    ratio (ModelMergeBlocks); with `constant` set every parameter gets those strengths.
    """

    other: Any  # model2's module
    other_patches: tuple[Any, ...]  # model2's own LoRAs / merges, applied to W2 first
    target: Target
    name: str  # for messages, e.g. "ModelMergeSimple(mini_sd15_seed1.safetensors)"
    constant: tuple[float, float] | None = None  # (strength_patch, strength_model)
    ratios: tuple[tuple[str, float], ...] = ()
    stamp: tuple[int, int] = (0, 0)
    strength: float = 1.0
    _path: list[Path] = field(default_factory=list, repr=False)

    @property
    def path(self) -> Path:
        """The identity the patcher keys this patch by (changes with model2 and the ratios)."""
        if not self._path:
            others = tuple((str(p.path), p.stamp, p.strength) for p in self.other_patches)
            spec = repr((_serial(self.other), others, self.target, self.constant, self.ratios))
            self._path.append(Path("merge-" + hashlib.sha256(spec.encode()).hexdigest()[:32]))
        return self._path[0]

    def strengths(self, name: str, module: Any) -> tuple[float, float]:
        """(strength_patch, strength_model) for one parameter of model1."""
        if self.constant is not None:
            return self.constant
        ratio = self.ratios[0][1]
        try:
            key = unet_key(name, module.config)[len(UNET_PREFIX) :]
        except ExportError:
            key = ""
        longest = 0
        for prefix, value in self.ratios:
            if key.startswith(prefix) and len(prefix) > longest:
                ratio, longest = value, len(prefix)
        return 1.0 - ratio, ratio

    def updates(self, module: Any, target: Target) -> dict[str, MergeUpdate]:
        """The patch of each parameter of `module` that model2 has with the same shape."""
        theirs = dict(self.other.named_parameters())
        out: dict[str, MergeUpdate] = {}
        for name, param in module.named_parameters():
            if target == "te" and name.endswith(CLIP_SKIPPED):
                continue
            other = theirs.get(name)
            if other is None or other.shape != param.shape:
                continue
            patch, model = self.strengths(name, module)
            out[name] = MergeUpdate(self, name, patch, model)
        return out

    def other_weight(self, name: str, device: torch.device) -> torch.Tensor:
        """Model2's weight `name` in fp32 as model2 computes it (its base plus its own patches)."""
        from nodes.sd.patcher import base_weight, patch_list

        weight = base_weight(self.other, name).to(device, torch.float32, copy=True)
        for update, strength in patch_list(self.other, self.other_patches, self.target, name):
            update.apply(weight, strength)
        return weight  # in fp32 even for a text encoder: the merged sum is rounded once
