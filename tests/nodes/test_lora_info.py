"""`lora_info` and `nodegraph lora-info`: trigger words, base model, family, rank, alpha, preview."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nodegraph.folders import Folders
from nodes.lora_info import lora_info, main


def _kohya_file(path: Path, meta: dict[str, str], alpha_dtype: torch.dtype = torch.bfloat16) -> Path:
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.zeros(16, 768, dtype=torch.float16),
            f"{stem}.lora_up.weight": torch.zeros(320, 16, dtype=torch.float16),
            f"{stem}.alpha": torch.tensor(8.0, dtype=alpha_dtype),
        },
        str(path),
        metadata=meta,
    )
    return path


def test_kohya_metadata_gives_title_trigger_words_and_base_model(tmp_path: Path) -> None:
    freq = {"10_cat": {"mycat": 40, "sitting": 12, "red chair": 30}, "5_misc": {"mycat": 5}}
    meta = {
        "ss_output_name": "My Cat",
        "ss_tag_frequency": json.dumps(freq),
        "ss_base_model_version": "sd_v1",
        "ss_network_module": "networks.lora",
    }
    path = _kohya_file(tmp_path / "cat.safetensors", meta)
    (tmp_path / "cat.preview.png").write_bytes(b"\x89PNG")
    info = lora_info(path)
    assert info["title"] == "My Cat"
    assert info["trigger_words"] == ["mycat", "red chair", "sitting"]
    assert (info["family"], info["family_source"], info["base_model"]) == ("sd15", "metadata", "sd_v1")
    assert (info["rank"], info["alpha"]) == (16, 8.0)  # rank from shapes, alpha read from the bf16 tensor
    assert info["preview"].endswith("cat.preview.png") and info["format"] == "LoRA (networks.lora)"


def test_sidecars_add_activation_text_and_trained_words(tmp_path: Path) -> None:
    path = _kohya_file(
        tmp_path / "style.safetensors",
        {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
        torch.float16,
    )
    (tmp_path / "style.json").write_text(json.dumps({"activation text": "inkstyle, bold lines"}))
    (tmp_path / "style.civitai.info").write_text(
        json.dumps({"trainedWords": ["ink drawing"], "baseModel": "SDXL"})
    )
    (tmp_path / "style.png").write_bytes(b"\x89PNG")
    info = lora_info(path)
    assert info["trigger_words"] == ["inkstyle", "bold lines", "ink drawing"]
    assert (info["family"], info["alpha"]) == ("sdxl", 8.0) and info["preview"].endswith("style.png")


def test_cli_main_resolves_names_in_the_loras_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = Folders.at(tmp_path)
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    _kohya_file(loras / "cat.safetensors", {"ss_tag_frequency": json.dumps({"a": {"mycat": 3}})})
    assert main(["cat"], folders, as_json=False) == 0
    out = capsys.readouterr().out
    assert "trigger words: mycat" in out and "SD1.5 (from keys)" in out
    assert main(["cat.safetensors", "nope"], folders, as_json=True) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["file"] == "cat.safetensors" and "nope" in captured.err


def test_lora_info_does_not_import_torch(tmp_path: Path) -> None:
    path = _kohya_file(tmp_path / "x.safetensors", {})
    code = "import sys, pathlib; from nodes.lora_info import lora_info;"
    code += f"lora_info(pathlib.Path({str(path)!r}));"
    code += "assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_the_lora_info_module_is_not_hidden_by_the_package_entry_point() -> None:
    """`from nodes import lora_info` (the canvas's LoRA routes) must give the module, before and after
    the CLI's entry point ran; a function of that name in nodes/__init__.py once hid it."""
    import nodes
    from nodes import lora_info as first

    assert hasattr(first, "preview_image") and hasattr(first, "lora_info")
    assert callable(nodes.describe_lora_files)


@pytest.mark.parametrize(
    ("meta", "sidecar", "base"),
    [
        ({"ss_sd_model_name": "ponyDiffusionV6XL_v6StartWithThisOne.safetensors"}, None, "Pony"),
        ({"ss_sd_model_name": "Illustrious-XL-v0.1.safetensors"}, None, "Illustrious"),
        ({"modelspec.base_model": "NoobAI-XL v-pred 1.0"}, None, "NoobAI"),
        ({}, {"baseModel": "Pony"}, "Pony"),  # a Civitai sidecar
        ({"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}, None, None),  # plain SDXL: no sub-base
    ],
)
def test_lora_info_names_the_sdxl_base_when_the_metadata_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], meta: dict, sidecar: dict | None, base: str | None
) -> None:
    stem = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # OpenCLIP bigG: an SDXL LoRA
    tensors = {
        f"{stem}.lora_down.weight": torch.zeros(4, 1280, dtype=torch.float16),
        f"{stem}.lora_up.weight": torch.zeros(1280, 4, dtype=torch.float16),
    }
    path = tmp_path / "xl.safetensors"
    save_file(tensors, str(path), metadata=meta)
    if sidecar is not None:
        (tmp_path / "xl.civitai.info").write_text(json.dumps(sidecar))
    info = lora_info(path)
    assert info["family"] == "sdxl" and info["sdxl_base"] == base
    assert main([str(path)], Folders.at(tmp_path)) == 0
    out = capsys.readouterr().out
    assert (f"SDXL ({base})" in out) if base else ("family:        SDXL (from" in out)
