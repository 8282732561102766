"""SDXL checkpoints: family and UNet config read from the tensors, bigG converted from open_clip's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from nodes.sd.checkpoint import LoadedCheckpoint, ldm_names

G = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def sdxl(sdxl_store: Any, mini_sdxl_checkpoint: Path) -> LoadedCheckpoint:
    loaded: LoadedCheckpoint = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    return loaded


def test_mini_sdxl_is_a_vega_shaped_sdxl_base(sdxl: LoadedCheckpoint) -> None:
    cfg = sdxl.unet.config
    assert sdxl.family == "sdxl"
    assert tuple(cfg.block_out_channels) == (320, 320, 640)
    assert cfg.layers_per_block == 2
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert tuple(cfg.attention_head_dim) == (5, 5, 10)  # heads of 64 channels
    assert tuple(cfg.transformer_layers_per_block)[1:] == (1, 2)
    assert cfg.use_linear_projection and cfg.cross_attention_dim == 2048
    assert cfg.addition_embed_type == "text_time" and cfg.projection_class_embeddings_input_dim == 2816
    assert sdxl.vae.config.scaling_factor == pytest.approx(0.13025)
    assert type(sdxl.text_encoder).__name__ == "CLIPTextModel"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl.text_encoder_2.config.num_hidden_layers == 32
    assert sdxl.text_encoder_2.config.hidden_act == "gelu"
    assert sdxl.text_encoder.config.hidden_act == "quick_gelu"


def test_bigg_is_split_and_transposed_from_the_open_clip_tensors(
    sdxl: LoadedCheckpoint, mini_sdxl_checkpoint: Path
) -> None:
    te = sdxl.text_encoder_2
    layer = te.text_model.encoder.layers[7].self_attn
    with safe_open(str(mini_sdxl_checkpoint), "pt") as f:
        fused = f.get_tensor(f"{G}transformer.resblocks.7.attn.in_proj_weight").float()
        bias = f.get_tensor(f"{G}transformer.resblocks.7.attn.in_proj_bias").float()
        proj = f.get_tensor(f"{G}text_projection").float()
        fc2 = f.get_tensor(f"{G}transformer.resblocks.31.mlp.c_proj.weight").float()
    for i, lin in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
        assert torch.equal(lin.weight, fused[i * 1280 : (i + 1) * 1280])
        assert torch.equal(lin.bias, bias[i * 1280 : (i + 1) * 1280])
    assert torch.equal(te.text_projection.weight, proj.t())
    assert torch.equal(te.text_model.encoder.layers[31].mlp.fc2.weight, fc2)


def test_every_module_knows_its_file_keys(sdxl: LoadedCheckpoint) -> None:
    for module, count in ((sdxl.unet, 618), (sdxl.text_encoder_2, None), (sdxl.text_encoder, None)):
        names = ldm_names(module)
        assert names is not None
        assert len(names) == len(module.state_dict())
        if count:
            assert len(names) == count
    g = ldm_names(sdxl.text_encoder_2)
    assert g is not None
    assert g[f"{G}transformer.resblocks.0.attn.in_proj_weight#k"] == (
        "text_model.encoder.layers.0.self_attn.k_proj.weight"
    )
    assert sdxl.ldm_keys[f"{G}text_projection#T"] == ("te2", "text_projection.weight")
