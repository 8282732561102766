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

from nodes.sd.hypernetwork import HypernetworkRef
from nodes.sd.model_sampling import EPS, ModelSampling


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
    family: str  # "sd15", "sdxl" (SDXL base family: Pony, Illustrious, SSD-1B, Vega ...), "sdxl_refiner"
    loras: tuple[LoraRef, ...] = ()
    sampling: ModelSampling = EPS  # eps / v-prediction / LCM / x0, zero terminal SNR (ModelSamplingDiscrete)
    # The sampling the file was loaded with (ComfyUI's `model.model.model_type`): the ModelSampling*
    # nodes change `sampling` only; CheckpointSave reads this one for `v_pred` and the predict key.
    base_sampling: ModelSampling = EPS
    hypernetworks: tuple[HypernetworkRef, ...] = ()  # attention patches, applied in order while sampling
    # FreeU, RescaleCFG, PAG ... (nodes.sd.unet_patches), applied by the sampler in this order
    patches: tuple[Any, ...] = ()

    def with_lora(self, lora: LoraRef) -> ModelHandle:
        return replace(self, loras=self.loras + (lora,))

    def with_patch(self, patch: Any) -> ModelHandle:
        return replace(self, patches=self.patches + (patch,))


@dataclass(frozen=True, eq=False)
class ClipHandle:
    """CLIP: the text encoder(s) (fp32 storage of fp16-rounded weights), the tokenizer, the
    embeddings folders, CLIP skip and the LoRA list.

    SD1.x: `text_encoder` is CLIP-L (transformers `CLIPTextModel`). SDXL base: `text_encoder` CLIP-L
    and `text_encoder_2` OpenCLIP bigG (`CLIPTextModelWithProjection`); the refiner: bigG alone
    (`text_encoder` None). `tokenizer` is CLIP-L's (bigG's is the same BPE, padded with 0)."""

    text_encoder: Any
    tokenizer: Any
    source: str
    family: str
    embedding_dirs: tuple[Path, ...] = ()
    # None = the family's default (SD1.x last layer, SDXL penultimate); -n = CLIPSetLastLayer(-n)
    layer_idx: int | None = None
    loras: tuple[LoraRef, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: Any = None

    def with_lora(self, lora: LoraRef) -> ClipHandle:
        return replace(self, loras=self.loras + (lora,))


@dataclass(frozen=True, eq=False)
class VaeHandle:
    """VAE: a diffusers `AutoencoderKL` (fp32, eval mode)."""

    vae: Any
    source: str
    scaling_factor: float = 0.18215
