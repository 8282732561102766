"""What each socket type carries: the Python type of the values on its links.

The engine knows socket types by name only (`nodegraph.types`); the node layer binds each name to
the type of its values here. Every node's `run` annotates a socket input with its socket's value
type (`T | None` where the input is optional) and returns a tuple of its outputs' value types, so
mypy checks a link's two ends against one type; `tests/nodes/test_value_types.py` holds every node
to this table.
"""

from __future__ import annotations

from typing import Any

import torch

from nodegraph.types import (
    BOOLEAN,
    CLIP,
    CLIP_VISION,
    CLIP_VISION_OUTPUT,
    COMBO,
    CONDITIONING,
    CONTROL_NET,
    EXTRA_PNGINFO,
    FLOAT,
    GLIGEN,
    GUIDER,
    IMAGE,
    INT,
    LATENT,
    LORA_STACK,
    MASK,
    MODEL,
    NOISE,
    PROMPT,
    SAMPLER,
    SIGMAS,
    STRING,
    UNIQUE_ID,
    UPSCALE_MODEL,
    VAE,
    SocketType,
)
from nodes.custom_sampling import GuiderValue, NoiseSource, SamplerChoice
from nodes.lora_stacks import StackEntry
from nodes.sd.clip_vision import ClipVision, ClipVisionOutput
from nodes.sd.controlnet import ControlModel
from nodes.sd.esrgan import UpscaleModel
from nodes.sd.gligen import GligenModel
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle
from nodes.sd.values import Conditioning, Latent

VALUE_TYPES: dict[SocketType, Any] = {
    MODEL: ModelHandle,
    CLIP: ClipHandle,
    VAE: VaeHandle,
    CONDITIONING: Conditioning,
    LATENT: Latent,
    IMAGE: torch.Tensor,  # [B, H, W, C] float 0..1
    MASK: torch.Tensor,  # [B, H, W] (or [H, W]) float 0..1
    SIGMAS: torch.Tensor,  # 1-D, descending, ending at 0
    SAMPLER: SamplerChoice,
    GUIDER: GuiderValue,
    NOISE: NoiseSource,
    UPSCALE_MODEL: UpscaleModel,
    CONTROL_NET: ControlModel,
    CLIP_VISION: ClipVision,
    CLIP_VISION_OUTPUT: ClipVisionOutput,
    GLIGEN: GligenModel,
    LORA_STACK: tuple[StackEntry, ...],
    INT: int,
    FLOAT: float,
    STRING: str,
    BOOLEAN: bool,
    COMBO: str,
}

# What the executor passes for each hidden input kind.
HIDDEN_VALUE_TYPES: dict[str, Any] = {
    PROMPT: dict[str, Any],
    EXTRA_PNGINFO: dict[str, Any],
    UNIQUE_ID: str,
}
