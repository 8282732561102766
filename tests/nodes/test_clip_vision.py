"""CLIP vision: a tiny random CLIPVisionModelWithProjection saved as a real file is (transformers'
layout, fp16), loaded by CLIPVisionLoader and encoded with ComfyUI's preprocessing; unCLIP refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.clip_vision import CLIPVisionEncode, CLIPVisionLoader, unCLIPCheckpointLoader, unCLIPConditioning
from nodes.sd.clip_vision import vision_config

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 16,
    "patch_size": 8,
    "image_size": 32,
    "projection_dim": 24,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


@pytest.fixture(scope="module")
def reference() -> Any:
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # the values a fp16 file holds
    return model


@pytest.fixture
def ctx(tmp_path: Path, reference: Any) -> RecordingContext:
    folder = tmp_path / "models" / "clip_vision"
    folder.mkdir(parents=True)
    state = {k: v.half().contiguous() for k, v in reference.state_dict().items() if "position_ids" not in k}
    save_file(state, str(folder / "tiny_vision.safetensors"))
    save_file({"foo.weight": torch.zeros(2)}, str(folder / "not_vision.safetensors"))
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    return RecordingContext(Environment(Folders.at(tmp_path)))


def preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI's clip_preprocess with crop, written out for a wide image."""
    x = image[..., :3].permute(0, 3, 1, 2)
    h, w = x.shape[2], x.shape[3]
    scaled = (size, round(size / h * w))
    x = F.interpolate(x, size=scaled, mode="bicubic", antialias=True)
    left = (scaled[1] - size) // 2
    x = x[:, :, :, left : left + size]
    x = (x * 255).clamp(0, 255).round() / 255
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def test_encode_matches_the_model_on_comfyuis_preprocessing(ctx: RecordingContext, reference: Any) -> None:
    (vision,) = CLIPVisionLoader().run(ctx, "tiny_vision.safetensors")
    assert vision.image_size == 32 and vision.model.config.num_attention_heads == 16
    image = torch.rand(2, 40, 64, 4, generator=torch.Generator().manual_seed(1))  # RGBA, wide
    (out,) = CLIPVisionEncode().run(ctx, vision, image, "center")
    with torch.no_grad():
        want = reference(pixel_values=preprocess(image, 32), output_hidden_states=True)
    torch.testing.assert_close(out.image_embeds, want.image_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.penultimate_hidden_states, want.hidden_states[-2], rtol=1e-5, atol=1e-5)
    assert out.image_embeds.shape == (2, 24) and out.last_hidden_state.shape == (2, 17, 64)
    (squashed,) = CLIPVisionEncode().run(ctx, vision, image, "none")
    assert not torch.allclose(squashed.image_embeds, out.image_embeds)


def test_configs_of_comfyuis_vision_models() -> None:
    def shapes(hidden: int, layers: int, patch: int, positions: int, proj: int) -> tuple[Any, list[str]]:
        table = {
            "vision_model.embeddings.patch_embedding.weight": (hidden, 3, patch, patch),
            "vision_model.embeddings.position_embedding.weight": (positions, hidden),
            "vision_model.encoder.layers.0.mlp.fc1.weight": (hidden * 4, hidden),
            "visual_projection.weight": (proj, hidden),
        }
        keys = [*table, *(f"vision_model.encoder.layers.{i}.layer_norm1.weight" for i in range(layers))]
        return table.__getitem__, keys

    vit_l = vision_config(*shapes(1024, 24, 14, 257, 768), "")
    assert (vit_l["image_size"], vit_l["hidden_act"], vit_l["projection_dim"]) == (224, "quick_gelu", 768)
    vit_h = vision_config(*shapes(1280, 32, 14, 257, 1024), "")
    assert (vit_h["num_hidden_layers"], vit_h["hidden_act"], vit_h["num_attention_heads"]) == (32, "gelu", 16)
    assert vision_config(*shapes(1024, 24, 14, 577, 768), "")["image_size"] == 336


def test_bad_files_and_inputs_name_the_node(ctx: RecordingContext) -> None:
    with pytest.raises(
        ValueError, match="CLIPVisionLoader: clip_name: 'not_vision.safetensors' is not a CLIP vision"
    ):
        CLIPVisionLoader().run(ctx, "not_vision.safetensors")
    with pytest.raises(ValueError, match="CLIPVisionEncode: input clip_vision"):
        CLIPVisionEncode().run(ctx, None, torch.zeros(1, 8, 8, 3), "center")  # type: ignore[arg-type]


def test_unclip_conditioning_appends_comfyuis_entry(ctx: RecordingContext) -> None:
    (vision,) = CLIPVisionLoader().run(ctx, "tiny_vision.safetensors")
    (out,) = CLIPVisionEncode().run(ctx, vision, torch.rand(1, 32, 32, 3), "center")
    cond = [(torch.zeros(1, 77, 768), {"strength": 1.0})]
    (once,) = unCLIPConditioning().run(ctx, cond, out, 0.8, 0.1)
    (twice,) = unCLIPConditioning().run(ctx, once, out, 0.5, 0.0)
    entries = twice[0][1]["unclip_conditioning"]
    assert [(e["strength"], e["noise_augmentation"]) for e in entries] == [(0.8, 0.1), (0.5, 0.0)]
    assert entries[0]["clip_vision_output"] is out and "unclip_conditioning" not in cond[0][1]
    assert unCLIPConditioning().run(ctx, cond, out, 0.0, 0.1)[0] is cond


def test_unclip_checkpoints_are_refused_naming_file_and_family(
    ctx: RecordingContext, tmp_path: Path, mini_checkpoint: Path
) -> None:
    folder = tmp_path / "models" / "checkpoints"
    save_file(
        {
            "embedder.model.visual.proj": torch.zeros(2),
            "cond_stage_model.model.ln_final.weight": torch.zeros(2),
        },
        str(folder / "sd21-unclip-h.safetensors"),
    )
    (folder / "mini.safetensors").symlink_to(mini_checkpoint)
    with pytest.raises(ValueError, match="'sd21-unclip-h.safetensors' is an SD2.x unCLIP checkpoint"):
        unCLIPCheckpointLoader().run(ctx, "sd21-unclip-h.safetensors")
    with pytest.raises(ValueError, match="'mini.safetensors' is an SD1.x checkpoint without an unCLIP image"):
        unCLIPCheckpointLoader().run(ctx, "mini.safetensors")
