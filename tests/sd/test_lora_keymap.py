"""Key maps and family detection: LDM names at full SD1.5 depth, stems, families from metadata and shapes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodes.sd.lora.family import detect, from_keys
from nodes.sd.lora.keymap import te_stems, unet_stems
from nodes.sd.lora.ldm_export import unet_key
from tests.conftest import oracle_module

SD15 = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "transformer_depth": [1, 1, 1, 0],
    "transformer_depth_middle": 1,
    "num_heads": 8,
    "context_dim": 768,
    "time_embed_dim": 1280,
    "ff_mult": 4,
}


@pytest.mark.parametrize("cfg", [SD15, None], ids=["sd15-full", "mini"])
def test_ldm_names_agree_with_diffusers_converter_at_any_depth(cfg: dict[str, Any] | None) -> None:
    """Every UNet parameter's LDM name equals the one diffusers' own converter assigns."""
    from diffusers import UNet2DConditionModel

    from nodes.sd.convert import unet_key_map

    base = oracle_module("make_mini_sd15")
    cfg = cfg or base.UNET_CFG
    specs = {key: shape for key, shape, *_ in base.unet_specs(cfg)}
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            **{k: v for k, v in base.diffusers_unet_config(cfg).items() if k[0] != "_"}
        )
    reference = unet_key_map(
        list(specs), lambda k: tuple(specs[k]), {"layers_per_block": cfg["num_res_blocks"]}
    )
    ours = {name: unet_key(name, unet.config) for name, _ in unet.named_parameters()}
    assert ours == reference


def test_stems_cover_kohya_ldm_peft_and_processor_forms() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    base = oracle_module("make_mini_sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in base.diffusers_unet_config().items() if k[0] != "_"})
        te = CLIPTextModel(
            CLIPTextConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2)
        )
    stems = unet_stems(unet)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for stem in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
        f"unet.{q}",
        q,
        f"lycoris_{q.replace('.', '_')}",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q",
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    ):
        assert stems[stem] == q, stem
    assert stems["lora_unet_middle_block_2_out_layers_3"] == "mid_block.resnets.1.conv2"
    tstems = te_stems(te)
    for stem in (
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
        "lora_te1_text_model_encoder_layers_1_mlp_fc2",
        "text_encoder.text_model.encoder.layers.1.mlp.fc2",
    ):
        assert tstems[stem] == "encoder.layers.1.mlp.fc2"
    assert tstems["lora_te_text_model_encoder_layers_0_layer_norm1"] == "encoder.layers.0.layer_norm1"


@pytest.mark.parametrize(
    ("meta", "family"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"ss_base_model_version": "sd_v1"}, "sd15"),
        ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd15"),
    ],
)
def test_family_from_metadata(meta: dict[str, str], family: str) -> None:
    assert detect(meta, {"lora_unet_x.lora_down.weight": (4, 768)}) == (family, "metadata")


@pytest.mark.parametrize(
    ("shapes", "family"),
    [
        ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 1280)}, "sdxl"),
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
                    4,
                    1024,
                )
            },
            "sd2",
        ),
        (
            {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (
                    4,
                    768,
                )
            },
            "sd15",
        ),
        ({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": (4, 640)}, "sdxl"),
        ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (8, 1024)}, "sd2"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (16, 3072)}, "flux"),
        ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072)}, "flux"),
        ({"lora_unet_mid_block_resnets_0_conv1.lora_down.weight": (4, 1280, 3, 3)}, None),
    ],
)
def test_family_from_key_names_and_shapes(shapes: dict[str, tuple[int, ...]], family: str | None) -> None:
    assert from_keys(shapes) == family
