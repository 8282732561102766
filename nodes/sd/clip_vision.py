"""CLIP vision models (ComfyUI's comfy/clip_vision.py and clip_model.py) on transformers'
`CLIPVisionModelWithProjection`.

A file in `models/clip_vision` holds transformers' layout (`vision_model.`..., `visual_projection.`),
as ComfyUI's CLIP-ViT-L/H/bigG files do; a `clip_vision.`-style prefix before `vision_model.` is
dropped. The configuration comes from the tensors' shapes, with ComfyUI's constants for what
shapes cannot tell: 16 attention heads (every ComfyUI CLIP vision config has 16), `quick_gelu` for
OpenAI's ViT-L/14 (1024 wide, 24 layers) and `gelu` for the others, layer norm eps 1e-5.

Encoding, as ComfyUI's `encode_image` + `clip_preprocess`:

1. RGB only; to [B, 3, H, W]. If not already size x size: with crop, scale the short side to
   `size` (bicubic, antialiased) and cut the centre square; without, squash to size x size.
2. Quantise to 8 bits (`round(clip(255·x)) / 255`), then normalise by CLIP's mean and std.
3. The model's last hidden state (before the post layer norm), the penultimate layer's hidden
   state, and the image embedding (post layer norm of the class token, projected).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nodes.sd.checkpoint import open_source
from nodes.sd.safetensors_file import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEADS = 16
UNCLIP_IMAGE_ENCODER = ("embedder.model.visual.", "embedder.transformer.vision_model.")


@dataclass(frozen=True, eq=False)
class ClipVision:
    """CLIP_VISION: a transformers CLIPVisionModelWithProjection (fp32, eval) and its input size."""

    model: Any
    source: str
    image_size: int


@dataclass(frozen=True, eq=False)
class ClipVisionOutput:
    """CLIP_VISION_OUTPUT: ComfyUI's Output fields."""

    last_hidden_state: torch.Tensor
    penultimate_hidden_states: torch.Tensor
    image_embeds: torch.Tensor


def _strip(keys: list[str]) -> str:
    """The prefix before `vision_model.` shared by the file's keys ("" for transformers' own files)."""
    for key in keys:
        if "vision_model.embeddings.patch_embedding.weight" in key:
            return key[: key.index("vision_model.")]
    raise CheckpointError("no CLIP vision model in it (no vision_model.embeddings.patch_embedding.weight)")


def vision_config(shape_of: Any, keys: list[str], prefix: str) -> dict[str, Any]:
    """CLIPVisionConfig arguments from the tensors' shapes (see the module docstring)."""
    patch = shape_of(prefix + "vision_model.embeddings.patch_embedding.weight")
    positions = shape_of(prefix + "vision_model.embeddings.position_embedding.weight")[0]
    layers = 1 + max(
        int(k[len(prefix + "vision_model.encoder.layers.") :].split(".")[0])
        for k in keys
        if k.startswith(prefix + "vision_model.encoder.layers.")
    )
    hidden, grid = patch[0], round((positions - 1) ** 0.5)
    projection = prefix + "visual_projection.weight"
    return {
        "hidden_size": hidden,
        "intermediate_size": shape_of(prefix + "vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_channels": patch[1],
        "patch_size": patch[2],
        "image_size": grid * patch[2],
        "projection_dim": shape_of(projection)[0] if projection in keys else hidden,
        "hidden_act": "quick_gelu" if (hidden, layers) == (1024, 24) else "gelu",
        "layer_norm_eps": 1e-5,
    }


def load_clip_vision(path: Path, name: str) -> ClipVision:
    """A CLIP vision model from a file (safetensors, or a weights-only pickle)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    source = open_source(path)
    keys = source.keys()
    if any(k.startswith(UNCLIP_IMAGE_ENCODER) for k in keys) and not any(
        "vision_model.embeddings" in k for k in keys
    ):
        raise CheckpointError(f"'{name}' is an unCLIP checkpoint (SD2.x), not a CLIP vision model")
    try:
        prefix = _strip(keys)
        settings = vision_config(source.shape, keys, prefix)
        config = CLIPVisionConfig(**settings)
    except (CheckpointError, KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"'{name}' is not a CLIP vision model in transformers' layout: {exc}") from exc
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    wanted = dict(model.state_dict())
    state = {}
    for key in wanted:
        full = prefix + key
        if full not in keys:
            raise CheckpointError(f"'{name}' lacks {full}; the file is incomplete or not a CLIP vision model")
        tensor = source.get(full).to(torch.float32)
        if tuple(tensor.shape) != tuple(wanted[key].shape):
            raise CheckpointError(
                f"'{name}': {full} has shape {tuple(tensor.shape)}, expected {tuple(wanted[key].shape)}"
            )
        state[key] = tensor
    model.load_state_dict(state, assign=True)
    embeddings = model.vision_model.embeddings  # its position ids are a buffer no file holds
    positions = torch.arange(embeddings.num_positions).expand((1, -1))
    embeddings.register_buffer("position_ids", positions, persistent=False)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise CheckpointError(f"'{name}' leaves part of the CLIP vision model unset")
    model.train(False)
    return ClipVision(model, name, int(settings["image_size"]))


def clip_preprocess(image: torch.Tensor, size: int, crop: bool = True) -> torch.Tensor:
    """ComfyUI's clip_preprocess: [B, H, W, C] in 0..1 -> normalised [B, 3, size, size]."""
    image = image[..., :3].movedim(-1, 1).float()
    if image.shape[2] != size or image.shape[3] != size:
        if crop:
            scale = size / min(image.shape[2], image.shape[3])
            scaled = (round(scale * image.shape[2]), round(scale * image.shape[3]))
        else:
            scaled = (size, size)
        image = torch.nn.functional.interpolate(image, size=scaled, mode="bicubic", antialias=True)
        top, left = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, top : top + size, left : left + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean) / std


def encode_image(vision: ClipVision, image: torch.Tensor, crop: bool) -> ClipVisionOutput:
    """ClipVisionModel.encode_image: the three outputs of one preprocessed batch."""
    pixels = clip_preprocess(image, vision.image_size, crop)
    with torch.inference_mode():
        out = vision.model(pixel_values=pixels, output_hidden_states=True)
    return ClipVisionOutput(
        last_hidden_state=out.last_hidden_state.float(),
        penultimate_hidden_states=out.hidden_states[-2].float(),
        image_embeds=out.image_embeds.float(),
    )
