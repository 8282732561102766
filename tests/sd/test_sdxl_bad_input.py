"""Bad SDXL-era input: each refusal names the file and what it is (small synthetic files, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nodes.sd.checkpoint import CheckpointError, load_checkpoint

U = "model.diffusion_model."


def _file(tmp_path: Path, name: str, keys: dict[str, tuple[int, ...]]) -> Path:
    path = tmp_path / name
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in keys.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("name", "keys", "message"),
    [
        ("flux1.safetensors", {"double_blocks.0.img_attn.qkv.weight": (3, 1)}, "is a Flux model"),
        ("sd3.safetensors", {f"{U}joint_blocks.0.x_block.attn.qkv.weight": (3, 1)}, "Stable Diffusion 3"),
        ("sdxl_vae.safetensors", {"decoder.up.0.block.0.conv1.weight": (1, 1, 1, 1)}, "it is a VAE"),
        ("clip_g.safetensors", {"text_model.encoder.layers.0.mlp.fc1.weight": (2, 1)}, "text encoder alone"),
        (
            "v2-1_768-ema-pruned.safetensors",
            {f"{U}input_blocks.0.0.weight": (2, 4, 1, 1), "cond_stage_model.model.ln_final.weight": (1024,)},
            "is an SD2.x checkpoint",
        ),
        (
            "te_only.safetensors",
            {"conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight": (2,)},
            "it is an SDXL text encoder, not a full SDXL checkpoint",
        ),
        (
            "unet_only.safetensors",
            {f"{U}input_blocks.0.0.weight": (2, 4, 1, 1), f"{U}label_emb.0.0.weight": (2, 2816)},
            "an SDXL UNet alone .*UNETLoader",
        ),
        (
            "refiner_no_te.safetensors",
            {
                f"{U}input_blocks.0.0.weight": (2, 4, 1, 1),
                f"{U}label_emb.0.0.weight": (2, 2560),
                "first_stage_model.decoder.conv_in.weight": (1, 4, 1, 1),
            },
            "refiner UNet without its OpenCLIP bigG",
        ),
    ],
)
def test_other_files_are_refused_by_name(
    tmp_path: Path, name: str, keys: dict[str, tuple[int, ...]], message: str
) -> None:
    path = _file(tmp_path, name, keys)
    with pytest.raises(CheckpointError, match=f"'{name}'.*{message}"):
        load_checkpoint(path)


def test_a_truncated_sdxl_file_is_named(tmp_path: Path) -> None:
    path = _file(tmp_path, "sd_xl_base.safetensors", {"conditioner.embedders.0.transformer.x": (64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="'sd_xl_base.safetensors' is truncated"):
        load_checkpoint(path)
