"""The coverage report of one LoRA load: what matched, what did not, and whether it fits the model at all.

One report per load, never one line per key: a partly matched LoRA gives one warning with the
counts; a LoRA that matches nothing, or is for another base model, is refused with both file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nodes.sd.lora.family import compatible, family_name
from nodes.sd.lora.loader import TE_PREFIXES, Decoded, LoraFile

_SHOWN = 8  # unmatched keys quoted in a message; the full list is in the report's details


class LoraMismatchError(ValueError):
    """The LoRA does not fit the model: another family, or no module matched."""


@dataclass(frozen=True)
class Coverage:
    """How one LoRA file maps onto one model (and text encoder)."""

    lora: str
    family: str
    family_source: str
    total_modules: int
    unet_modules: int
    te_modules: int
    unet_weights: int
    unet_biases: int
    te_weights: int
    te_biases: int
    skipped_te: int  # text-encoder modules a model-only load does not apply
    unmatched: tuple[str, ...]  # stems and keys that name nothing in this model
    failed: tuple[str, ...]  # "stem: why" for modules that matched but could not apply
    key_family: str | None = None  # the family the key names and shapes suggest
    # SDXL's second text encoder (OpenCLIP bigG); `te_*` then count CLIP-L (the refiner: bigG in te2)
    te2_modules: int = 0
    te2_weights: int = 0
    te2_biases: int = 0
    two_encoders: bool = False

    @property
    def family_text(self) -> str:
        """ "SD1.5, from keys", or both readings when metadata and keys disagree."""
        text = f"{family_name(self.family)}, from {self.family_source}"
        if self.family_source == "metadata" and self.key_family not in (None, self.family):
            text += f"; its keys look {family_name(str(self.key_family))}"
        return text

    @property
    def matched(self) -> int:
        return self.unet_modules + self.te_modules + self.te2_modules

    def _te_text(self) -> str:
        if self.two_encoders:
            return f"{self.te_modules} CLIP-L, {self.te2_modules} CLIP-G text encoder"
        return f"{self.te_modules + self.te2_modules} text encoder"

    @property
    def complete(self) -> bool:
        return not self.unmatched and not self.failed

    def summary(self) -> str:
        text = (
            f"LoRA {self.lora} ({self.family_text}): "
            f"{self.matched} of {self.total_modules} modules matched "
            f"({self.unet_modules} UNet, {self._te_text()})"
        )
        if self.skipped_te:
            text += f", {self.skipped_te} text-encoder modules not applied by a model-only loader"
        if self.unmatched:
            shown = ", ".join(self.unmatched[:_SHOWN]) + (" ..." if len(self.unmatched) > _SHOWN else "")
            n = len(self.unmatched)
            text += f"; {n} {'key' if n == 1 else 'keys'} did not match: {shown}"
        if self.failed:
            n = len(self.failed)
            text += f"; {n} {'module' if n == 1 else 'modules'} could not apply: {'; '.join(self.failed[:3])}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "lora": self.lora,
            "family": self.family,
            "family_source": self.family_source,
            "key_family": self.key_family,
            "total_modules": self.total_modules,
            "matched": self.matched,
            "unet_modules": self.unet_modules,
            "te_modules": self.te_modules,
            "unet_weights": self.unet_weights,
            "unet_biases": self.unet_biases,
            "te_weights": self.te_weights,
            "te_biases": self.te_biases,
            "te2_modules": self.te2_modules,
            "te2_weights": self.te2_weights,
            "te2_biases": self.te2_biases,
            "skipped_te": self.skipped_te,
            "unmatched": list(self.unmatched),
            "failed": list(self.failed),
        }


def _counts(dec: Decoded | None) -> tuple[int, int, int]:
    if dec is None:
        return 0, 0, 0
    weights = sum(1 for k in dec.updates if k.endswith(".weight"))
    return dec.modules, weights, len(dec.updates) - weights


def coverage(
    lora: LoraFile, name: str, unet: Decoded | None, te: Decoded | None, te2: Decoded | None = None
) -> Coverage:
    """The report for `lora` decoded against a UNet and/or text encoders (None: not loaded).

    `te2`: SDXL's bigG beside the CLIP-L `te`, or the refiner's bigG alone (with `te` None).
    """
    parts = [d for d in (unet, te, te2) if d is not None]
    matched = set().union(*(d.matched for d in parts))
    rest = [s for s in lora.groups if s not in matched]
    no_te = te is None and te2 is None
    skipped = [s for s in rest if no_te and s.startswith(TE_PREFIXES)]
    unmatched = sorted(set(rest) - set(skipped)) + lora.unknown_keys
    unmatched += [key for d in parts for key in d.unused]
    failed = {k: v for d in parts for k, v in d.failed.items()}
    um, uw, ub = _counts(unet)
    tm, tw, tb = _counts(te)
    t2m, t2w, t2b = _counts(te2)
    return Coverage(
        lora=name,
        family=lora.family,
        family_source=lora.family_source,
        key_family=lora.key_family,
        total_modules=len(lora.groups),
        unet_modules=um,
        te_modules=tm,
        unet_weights=uw,
        unet_biases=ub,
        te_weights=tw,
        te_biases=tb,
        te2_modules=t2m,
        te2_weights=t2w,
        te2_biases=t2b,
        two_encoders=te is not None and te2 is not None,
        skipped_te=len(skipped),
        unmatched=tuple(unmatched),
        failed=tuple(f"{k}: {v}" for k, v in sorted(failed.items())),
    )


def _a(name: str) -> str:
    """ "an SDXL", "a Flux": the article as the name is spoken."""
    spelled = name[:2].isupper()  # an acronym is read letter by letter: "an SD1.5"
    vowel = name[:1] in "AEFHILMNORSX" if spelled else name[:1].lower() in "aeiou"
    return ("an " if vowel else "a ") + name


def check(report: Coverage, checkpoint: str, model_family: str) -> str | None:
    """Raise `LoraMismatchError` when the LoRA cannot apply; return a warning when it applies in part."""
    mislabelled = report.key_family == model_family and report.matched > 0 and not report.unmatched
    if mislabelled and not compatible(report.family, model_family):
        # The keys and shapes fit this model exactly: trust them over a wrong metadata label.
        return (
            f"{report.summary()}. Its metadata calls it {_a(family_name(report.family))} LoRA, but its "
            f"keys fit this {family_name(model_family)} checkpoint, so it was applied."
        )
    if not compatible(report.family, model_family):
        raise LoraMismatchError(
            f"{report.lora} is {_a(family_name(report.family))} LoRA; the checkpoint {checkpoint} is "
            f"{family_name(model_family)}. Pick a LoRA made for {family_name(model_family)} "
            f"(or {_a(family_name(report.family))} checkpoint). Family read from its {report.family_source}."
        )
    if report.matched == 0:
        what = (
            (
                f"its {report.skipped_te} modules are all text-encoder modules, which a model-only loader "
                "does not apply"
            )
            if report.skipped_te and not report.unmatched
            else (
                f"none of its {report.total_modules} modules matched (first keys: "
                f"{', '.join(report.unmatched[:3])})"
            )
        )
        raise LoraMismatchError(
            f"{report.lora} does not fit the checkpoint {checkpoint} "
            f"({family_name(model_family)}): {what}. Is it a LoRA for another base model?"
        )
    return None if report.complete else report.summary()
