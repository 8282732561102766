"""The values that travel on MODEL, CLIP and VAE links.

Values between nodes are immutable: a handle points at shared, loaded weights and carries its
LoRAs as data (which file, which strength, in which order). Weights change only inside the
consumer (the sampler, the text encoder), through `nodes.sd.patcher`, and are restored exactly
afterwards. Two handles with the same checkpoint and the same LoRA list are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LoraRef:
    """One LoRA applied by one loader node: the file (and its identity) and the strength."""

    path: Path
    stamp: tuple[int, int]  # (st_mtime_ns, st_size): a changed file is a different LoRA
    strength: float
    name: str  # the name the user picked, for messages


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """MODEL: a UNet (diffusers `UNet2DConditionModel`, fp32, eval mode) plus its LoRA list."""

    unet: Any
    source: str  # checkpoint file name, for messages
    family: str  # "sd15"
    loras: tuple[LoraRef, ...] = ()

    def with_lora(self, lora: LoraRef) -> ModelHandle:
        return replace(self, loras=self.loras + (lora,))


@dataclass(frozen=True, eq=False)
class ClipHandle:
    """CLIP: a text encoder (transformers `CLIPTextModel`, fp32 storage of fp16-rounded weights),
    its tokenizer, the embeddings folders, CLIP skip and its LoRA list."""

    text_encoder: Any
    tokenizer: Any
    source: str
    family: str
    embedding_dirs: tuple[Path, ...] = ()
    layer_idx: int | None = None  # None = last layer; -2 = CLIP skip 2 (CLIPSetLastLayer)
    loras: tuple[LoraRef, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def with_lora(self, lora: LoraRef) -> ClipHandle:
        return replace(self, loras=self.loras + (lora,))


@dataclass(frozen=True, eq=False)
class VaeHandle:
    """VAE: a diffusers `AutoencoderKL` (fp32, eval mode)."""

    vae: Any
    source: str
    scaling_factor: float = 0.18215
