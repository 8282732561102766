"""A1111/Civitai prompt tags: `<lora:name:weight>`, `<lora:name:te_weight:unet_weight>`, `te=`/`unet=`.

Parsing is torch-free and engine-free. A tag's name is found among the `loras` folder's names with
or without an extension, in subfolders by file name, and case-insensitively as a last resort, as
A1111 users expect (`find_tag`); the node resolves the name to a file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

_TAG = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin", ".pth", ".sft")


@dataclass(frozen=True)
class LoraTag:
    """One tag: the LoRA name and the text-encoder and UNet weights."""

    text: str
    name: str
    te_weight: float
    unet_weight: float


def _number(tag: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"LoRA tag {tag}: '{value}' is not a number; write e.g. <lora:name:0.8>") from None


def _weights(tag: str, args: list[str]) -> tuple[float, float]:
    """(te, unet): one number sets both, two set te then unet; `te=`/`unet=` name them."""
    named = {a.split("=", 1)[0].strip().lower(): a.split("=", 1)[1] for a in args if "=" in a}
    plain = [a for a in args if "=" not in a and a.strip()]
    if len(plain) > 2 or set(named) - {"te", "unet", "dyn"}:
        raise ValueError(f"LoRA tag {tag}: write <lora:name:weight> or <lora:name:te_weight:unet_weight>")
    te = _number(tag, plain[0]) if plain else 1.0
    unet = _number(tag, plain[1]) if len(plain) > 1 else te
    if "te" in named:
        te = _number(tag, named["te"])
    if "unet" in named:
        unet = _number(tag, named["unet"])
    return te, unet


def parse_tags(text: str) -> tuple[list[LoraTag], str]:
    """The tags in order of appearance, and the text with them removed (spacing tidied)."""
    tags = []
    for match in _TAG.finditer(text):
        args = match.group(3).split(":")[1:] if match.group(3) else []
        te, unet = _weights(match.group(0), args)
        tags.append(LoraTag(match.group(0), match.group(2).strip(), te, unet))
    cleaned = _TAG.sub("", text)
    cleaned = re.sub(r"[ \t]{2,}", " ", cleaned)
    cleaned = re.sub(r"[ \t]+([,\n])", r"\1", cleaned)
    cleaned = re.sub(r",[ \t]*(?=,)", "", cleaned)
    return tags, cleaned.strip().strip(",").strip()


def find_tag(names: Sequence[str], tag: LoraTag) -> str:
    """The name among `names` (the loras folder's files) that a tag means.

    Raises:
        ValueError: naming the tag, when no name fits.
    """
    names = list(names)
    want = tag.name.replace("\\", "/")
    candidates = [want] + [want + ext for ext in _EXTENSIONS]
    for rule in (_exact, _by_file_name, _casefold):
        found = rule(names, candidates)
        if found is not None:
            return found
    raise ValueError(
        f"LoRA tag {tag.text}: no LoRA named '{tag.name}' in the loras folder; "
        "put the file there or fix the name in the prompt"
    )


def _exact(names: list[str], candidates: list[str]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _by_file_name(names: list[str], candidates: list[str]) -> str | None:
    return next((n for c in candidates for n in names if PurePosixPath(n).name == c), None)


def _casefold(names: list[str], candidates: list[str]) -> str | None:
    folded = [c.casefold() for c in candidates]
    for n in names:
        if n.casefold() in folded or PurePosixPath(n).name.casefold() in folded:
            return n
    return None
