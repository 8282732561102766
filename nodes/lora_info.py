"""What a LoRA file is, without loading it: trigger words, base model, family, rank, alpha, format, preview.

Torch-free: a .safetensors file is described from its header (8-byte little-endian length, then
JSON) plus the few scalar `alpha` tensors read by offset; A1111/Civitai sidecar files
(`name.json`, `name.civitai.info`) add activation text and trained words. `main` is the
`nodegraph lora-info FILE...` command.
"""

from __future__ import annotations

import json
import struct
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nodegraph.folders import Folders
from nodes.sd.header_json import MAX_HEADER_DEPTH, json_depth_ok
from nodes.sd.lora import family as families
from nodes.sd.lora.suffixes import split_key

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own header size limit
MAX_TAGS = 10
PREVIEW_SUFFIXES = (
    ".preview.png",
    ".png",
    ".preview.jpg",
    ".preview.jpeg",
    ".jpg",
    ".jpeg",
    ".preview.webp",
    ".webp",
)
_SCALAR = {"F16": "<e", "F32": "<f", "F64": "<d"}
_RANK_PARTS = (
    ".lora_down.weight",
    ".lora_A.weight",
    ".lora.down.weight",
    "_lora.down.weight",
    ".lora_linear_layer.down.weight",
    ".hada_w1_b",
    ".lokr_w2_b",
    ".lokr_w1_b",
)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(JSON header, offset of the data section) of a .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is too short to be a .safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise ValueError(f"{path.name} has an implausible header size; is it a .safetensors file?")
        raw = f.read(size)
    if not json_depth_ok(raw, MAX_HEADER_DEPTH):  # json.loads would recurse into a RecursionError
        raise ValueError(f"{path.name} has a header nested deeper than {MAX_HEADER_DEPTH} levels")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has no JSON object header")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError(f"{path.name} has a __metadata__ that is not an object")
    return header, 8 + size


def _scalar(path: Path, entry: dict[str, Any], data_start: int) -> float | None:
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = f.read(end - begin)
    if entry["dtype"] == "BF16" and len(raw) == 2:
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])  # bf16 is the top half of an fp32
    fmt = _SCALAR.get(entry["dtype"])
    return float(struct.unpack(fmt, raw)[0]) if fmt and len(raw) == struct.calcsize(fmt) else None


def _sidecar(path: Path) -> dict[str, Any]:
    """A1111 `name.json` and Civitai helper `name.civitai.info`, merged (missing or bad files give {})."""
    out: dict[str, Any] = {}
    for suffix in (".json", ".civitai.info"):
        side = path.with_name(path.stem + suffix)
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out |= data
    return out


def _tag_words(meta: dict[str, str]) -> list[str]:
    """kohya's `ss_tag_frequency` ({dataset: {tag: count}}): the most frequent training tags."""
    try:
        datasets = json.loads(meta.get("ss_tag_frequency", "{}"))
    except ValueError:
        return []
    counts: Counter[str] = Counter()
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        if isinstance(tags, dict):
            counts.update({str(t).strip(): int(c) for t, c in tags.items() if str(t).strip()})
    return [tag for tag, _ in counts.most_common(MAX_TAGS)]


def trigger_words(meta: dict[str, str], side: dict[str, Any]) -> list[str]:
    """The stated trigger phrase, sidecar activation text / trained words, then the top training tags."""
    # The SAI ModelSpec metadata's optional trigger phrase, comma-separated.
    words = [w.strip() for w in meta.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    activation = side.get("activation text")
    if isinstance(activation, str):
        words += [w.strip() for w in activation.split(",") if w.strip()]
    trained = side.get("trainedWords")
    if isinstance(trained, list):
        words += [str(w).strip() for w in trained if str(w).strip()]
    words += _tag_words(meta)
    return list(dict.fromkeys(words))


def _civitai_family(side: dict[str, Any]) -> str | None:
    base = str(side.get("baseModel") or side.get("sd version") or "").lower().replace(" ", "")
    for prefix, fam in (
        ("sd1", "sd15"),
        ("sd2", "sd2"),
        ("sdxl", "sdxl"),
        ("pony", "sdxl"),
        ("illustrious", "sdxl"),
        ("noob", "sdxl"),
        ("sd3", "sd3"),
        ("flux", "flux"),
    ):
        if base.startswith(prefix):
            return fam
    return None


# SDXL-family bases users pick LoRAs by; matched in the name of the model a LoRA was trained on.
SDXL_BASES = (("pony", "Pony"), ("illustrious", "Illustrious"), ("noob", "NoobAI"))


def sdxl_base(meta: dict[str, str], side: dict[str, Any]) -> str | None:
    """Pony / Illustrious / NoobAI when the training metadata or the Civitai sidecar says so."""
    sources = (
        meta.get("ss_sd_model_name", ""),
        meta.get("ss_base_model_version", ""),
        meta.get("modelspec.base_model", ""),
        str(side.get("baseModel") or ""),
    )
    for text in sources:
        for mark, name in SDXL_BASES:
            if mark in text.lower():
                return name
    return None


def network_format(keys: Sequence[str], meta: dict[str, str]) -> str:
    """The adapter kind, as a user names it."""
    joined = " ".join(keys)
    kinds = [
        name
        for mark, name in (
            (".dora_scale", "DoRA"),
            (".hada_", "LoHa"),
            (".lokr_", "LoKr"),
            (".diff", "full/diff"),
            (".lora_mid", "LoCon (Tucker)"),
            (".lora_A", "PEFT LoRA"),
            (".lora_linear_layer", "diffusers LoRA"),
            (".lora.down", "diffusers LoRA"),
            ("_lora.down", "diffusers LoRA"),
        )
        if mark in joined
    ]
    if not kinds and ".lora_down" in joined:
        conv = any("conv" in k and k.endswith(".lora_down.weight") for k in keys)
        kinds = ["LoCon" if conv else "LoRA"]
    module = meta.get("ss_network_module", "")
    fmt = ", ".join(dict.fromkeys(kinds)) or "unknown"
    return f"{fmt} ({module})" if module else fmt


def _rank(header: dict[str, Any]) -> int | None:
    ranks = Counter(
        int(v["shape"][0])
        for k, v in header.items()
        if k.endswith(_RANK_PARTS) and isinstance(v, dict) and v.get("shape")
    )
    return ranks.most_common(1)[0][0] if ranks else None


def _alpha(path: Path, header: dict[str, Any], start: int, meta: dict[str, str]) -> float | None:
    if meta.get("ss_network_alpha"):
        try:
            return float(meta["ss_network_alpha"])
        except ValueError:
            pass
    entry = next((v for k, v in header.items() if k.endswith(".alpha") and isinstance(v, dict)), None)
    return _scalar(path, entry, start) if entry else None


def preview_image(path: Path) -> Path | None:
    """The preview image stored beside the file (`name.preview.png`, `name.png`, ...)."""
    for suffix in PREVIEW_SUFFIXES:
        candidate = path.with_name(path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def lora_info(path: Path) -> dict[str, Any]:
    """Everything the canvas and `lora-info` show about one LoRA file (never loads its tensors)."""
    side = _sidecar(path)
    info: dict[str, Any] = {"file": path.name, "size": path.stat().st_size}
    if path.suffix.lower() not in (".safetensors", ".sft"):
        fam = _civitai_family(side)
        return info | {
            "title": path.stem,
            "format": "pickled state dict (no metadata without loading it)",
            "family": fam or "unknown",
            "family_source": "sidecar" if fam else "unknown",
            "base_model": side.get("baseModel") or side.get("sd version"),
            "rank": None,
            "alpha": None,
            "modules": None,
            "trigger_words": trigger_words({}, side),
            "preview": _str(preview_image(path)),
        }
    header, start = read_header(path)
    meta = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    shapes = {k: v["shape"] for k, v in header.items() if isinstance(v, dict) and "shape" in v}
    fam, source = families.detect(meta, shapes)
    if fam == "unknown" and _civitai_family(side):
        fam, source = str(_civitai_family(side)), "sidecar"
    variant = sdxl_base(meta, side) if fam == "sdxl" else None
    stems = {split[0] for split in map(split_key, header) if split is not None}
    return info | {
        "title": meta.get("ss_output_name") or meta.get("modelspec.title") or path.stem,
        "format": network_format(list(header), meta),
        "family": fam,
        "family_source": source,
        "base_model": meta.get("ss_base_model_version")
        or meta.get("modelspec.architecture")
        or side.get("baseModel")
        or side.get("sd version"),
        "trained_on": meta.get("ss_sd_model_name"),
        "sdxl_base": variant,
        "rank": int(meta["ss_network_dim"]) if meta.get("ss_network_dim", "").isdigit() else _rank(header),
        "alpha": _alpha(path, header, start, meta),
        "modules": len(stems),
        "keys": len(header),
        "trigger_words": trigger_words(meta, side),
        "preview": _str(preview_image(path)),
    }


def _str(path: Path | None) -> str | None:
    return str(path) if path else None


def _resolve(name: str, folders: Folders) -> Path:
    direct = Path(name)
    if direct.is_file():
        return direct
    for candidate in (name, name + ".safetensors"):
        try:
            return folders.resolve("loras", candidate)
        except (OSError, ValueError):
            continue
    raise FileNotFoundError(f"no LoRA file '{name}' (neither a path nor a name in the loras folder)")


def _text(info: dict[str, Any]) -> str:
    lines = [f"{info['file']}: {info['title']}"]
    fam = families.family_name(info["family"])
    if info.get("sdxl_base"):
        fam += f" ({info['sdxl_base']})"
    lines.append(
        f"  family:        {fam} (from {info['family_source']}); base model: {info.get('base_model') or '-'}"
    )
    lines.append(f"  format:        {info['format']}; rank {info['rank']}, alpha {info['alpha']}")
    if info.get("modules") is not None:
        lines.append(f"  modules:       {info['modules']} ({info['keys']} tensors)")
    lines.append(f"  trigger words: {', '.join(info['trigger_words']) or '-'}")
    lines.append(f"  preview:       {info['preview'] or '-'}")
    return "\n".join(lines)


def main(files: Sequence[str], folders: Folders, as_json: bool = False) -> int:
    """`nodegraph lora-info FILE...`: print each file's description; 1 when any cannot be read."""
    results: list[dict[str, Any]] = []
    status = 0
    for name in files:
        try:
            results.append(lora_info(_resolve(name, folders)))
        except (OSError, ValueError) as exc:
            print(f"lora-info: {name}: {exc}", file=sys.stderr)
            status = 1
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(_text(info) for info in results))
    return status
