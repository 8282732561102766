"""Which base model a LoRA was trained for, from its metadata and from its key names and shapes.

Torch-free (it reads only names, shapes and metadata strings), so `lora-info` and the server can
use it without loading the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

FAMILY_NAMES = {
    "sd15": "SD1.5",
    "sd2": "SD2",
    "sdxl": "SDXL",
    "sdxl_refiner": "SDXL refiner",
    "sd3": "SD3",
    "flux": "Flux",
    "unknown": "unknown-family",
}

# kohya `ss_base_model_version` prefixes
_KOHYA = (("sdxl", "sdxl"), ("sd_v1", "sd15"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux"))
# modelspec.architecture prefixes (Stability's model spec)
_MODELSPEC = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd15"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
)
# text-encoder / cross-attention width -> family (CLIP-L 768, OpenCLIP-H 1024, SDXL 2048, the SDXL
# refiner's bigG alone 1280)
_CONTEXT = {768: "sd15", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}


def family_name(family: str) -> str:
    """A family id as users write it ("sdxl" -> "SDXL")."""
    return FAMILY_NAMES.get(family, family)


def from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The family named by kohya's or the model spec's metadata, if any."""
    version = metadata.get("ss_base_model_version", "").lower()
    for prefix, family in _KOHYA:
        if version.startswith(prefix):
            return family
    arch = metadata.get("modelspec.architecture", "").lower()
    for prefix, family in _MODELSPEC:
        if arch.startswith(prefix):
            return family
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    return None


def _context_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """In-features of a cross-attention key/value projection, or a TE layer's width."""
    for key, shape in shapes.items():
        if ("attn2_to_k" in key or "attn2.to_k" in key or "attn2.processor.to_k" in key) and len(shape) >= 2:
            if key.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight", "_lora.down.weight")):
                return int(shape[1])
    for key, shape in shapes.items():
        if ("self_attn_q_proj" in key or "self_attn.q_proj" in key) and len(shape) == 2:
            if key.endswith(("lora_down.weight", "lora_A.weight", "lora_linear_layer.down.weight")):
                return int(shape[1])
    return None


def from_keys(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The family suggested by key names and shapes (None when they say nothing decisive)."""
    keys = list(shapes)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    flux_marks = (
        "double_blocks",
        "single_blocks",
        "single_transformer_blocks",
        "transformer.transformer_blocks",
    )
    if any(mark in k for k in keys for mark in flux_marks):
        return "flux"
    if any("joint_blocks" in k for k in keys):
        return "sd3"
    if any(
        "input_blocks_4_1_transformer_blocks_1" in k or "down_blocks_1_attentions_0_transformer_blocks_1" in k
        for k in keys
    ):
        return "sdxl"  # SDXL's deeper transformers; SD1/SD2 have one block per attention
    width = _context_width(shapes)
    return _CONTEXT.get(width) if width is not None else None


def detect(metadata: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> tuple[str, str]:
    """(family, how it was found: "metadata", "keys" or "unknown")."""
    family = from_metadata(metadata)
    if family is not None:
        return family, "metadata"
    family = from_keys(shapes)
    if family is not None:
        return family, "keys"
    return "unknown", "unknown"


def compatible(lora_family: str, model_family: str) -> bool:
    """Whether a LoRA of one family can apply to a model of another (unknown is given the benefit)."""
    return "unknown" in (lora_family, model_family) or lora_family == model_family
