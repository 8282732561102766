"""How LoRA file keys split into a module stem and a part name (torch-free: `lora-info` uses it too)."""

from __future__ import annotations

# Suffix after the stem -> the canonical part name. Longest suffixes are tried first.
SUFFIXES: dict[str, str] = {
    ".lora_up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_mid.weight": "mid",
    "_lora.up.weight": "up",
    "_lora.down.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.weight": "down",
    ".lora.up.weight": "up",
    ".lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B": "up",
    ".lora_A": "down",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".w_norm": "w_norm",
    ".b_norm": "b_norm",
}
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """(stem, part) of a LoRA file key, or None for a key of no known format."""
    for suffix in _ORDERED:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None
