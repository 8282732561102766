"""The demo model writer: a loadable SD1.5 layout, kohya LoRAs with metadata, deterministic, skips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

from nodegraph.folders import Folders
from nodes.demo import (
    CHECKPOINT_NAME,
    INPUT_IMAGE_NAME,
    LORA_NAMES,
    UNET_FULL,
    unet_specs,
    write_demo_models,
    write_lora,
)
from nodes.sd.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Folders, list[Path]]:
    folders = Folders.at(tmp_path_factory.mktemp("demo"))
    return folders, write_demo_models(folders)


def test_writes_the_checkpoint_and_two_loras_where_the_loaders_look(demo: tuple[Folders, list[Path]]) -> None:
    folders, paths = demo
    assert [p.name for p in paths] == [CHECKPOINT_NAME, *LORA_NAMES, INPUT_IMAGE_NAME]
    assert (folders.input_dir / INPUT_IMAGE_NAME).is_file()
    assert folders.list("checkpoints") == [CHECKPOINT_NAME]
    assert folders.list("loras") == sorted(LORA_NAMES)


def test_the_checkpoint_loads_strictly_as_sd15_with_the_mini_unet(demo: tuple[Folders, list[Path]]) -> None:
    loaded = load_checkpoint(demo[1][0])  # strict: every key used, every parameter filled
    assert loaded.family == "sd15"
    assert tuple(loaded.unet.config.block_out_channels) == (320, 640)
    assert loaded.text_encoder.config.num_hidden_layers == 12
    with safe_open(str(demo[1][0]), framework="pt") as f:
        assert "random" in f.metadata()["nodegraph_demo"]
        assert str(f.get_tensor("model.diffusion_model.out.2.weight").dtype) == "torch.float16"


def test_loras_carry_kohya_metadata(demo: tuple[Folders, list[Path]]) -> None:
    with safe_open(str(demo[1][1]), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "nodegraph_demo_lora_a"
    assert meta["ss_network_dim"] == "4" and '"noise": 2' in meta["ss_tag_frequency"]
    assert any(k.startswith("lora_te_text_model_encoder_layers_11_") for k in keys)
    assert any(k.endswith("attn2_to_out_0.lora_up.weight") for k in keys)


def test_existing_files_are_skipped_unless_forced(
    demo: tuple[Folders, list[Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    folders, _ = demo
    assert write_demo_models(folders) == []
    lora_b = folders.paths("loras")[0] / LORA_NAMES[1]
    lora_b.unlink()
    capsys.readouterr()
    assert write_demo_models(folders) == [lora_b]
    assert "RANDOM-WEIGHT" in capsys.readouterr().out


def test_the_lora_tensors_are_the_same_on_every_write(tmp_path: Path) -> None:
    a = write_lora(tmp_path / "one.safetensors", "b", rank=8, alpha=4.0)
    b = write_lora(tmp_path / "two.safetensors", "b", rank=8, alpha=4.0)
    with safe_open(str(a), framework="np") as fa, safe_open(str(b), framework="np") as fb:
        assert list(fa.keys()) == list(fb.keys())
        assert all((fa.get_tensor(k) == fb.get_tensor(k)).all() for k in fa.keys())


def test_full_layout_has_sd15s_860m_unet_parameters() -> None:
    total = sum(math.prod(shape) for _, shape, _, _ in unet_specs(UNET_FULL))
    assert total == 859_520_964


def test_demo_sdxl_writes_two_sdxl_loras_that_fit_the_sdxl_demo_model(tmp_path: Path) -> None:
    from nodegraph.env import Environment
    from nodegraph.testing import RecordingContext
    from nodes.demo_sdxl import SDXL_DEMO_NAME, SDXL_LORA_NAMES
    from nodes.loaders import CheckpointLoaderSimple
    from nodes.lora import load_lora

    folders = Folders.at(tmp_path)
    written = [p.name for p in write_demo_models(folders, sdxl=True)]
    assert set(SDXL_LORA_NAMES) <= set(written) and SDXL_DEMO_NAME in written
    ctx = RecordingContext(Environment(folders))
    model, clip, _ = CheckpointLoaderSimple().run(ctx, SDXL_DEMO_NAME)
    counts = []
    for name in SDXL_LORA_NAMES:
        path = folders.resolve("loras", name)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and "random" in meta["nodegraph_demo"]
        report = load_lora(ctx, model, clip, path, name, (1.0, 1.0))[2]
        assert report.unmatched == () and report.failed == () and report.family == "sdxl"
        counts.append((report.unet_modules, report.te_modules, report.te2_modules))
    assert counts == [(24, 9, 9), (18, 3, 3)]
    assert not ctx.warnings


def test_make_runs_demo_step_writes_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make run` first runs `nodegraph demo --if-no-checkpoint`: through the CLI and the nodes
    package's entry point (a signature mismatch there once broke `make run` with a TypeError)."""
    from nodegraph import cli

    argv = ["demo", "--if-no-checkpoint", "--base-directory", str(tmp_path)]
    assert cli.main(argv) == 0
    folders = Folders.at(tmp_path)
    assert folders.list("checkpoints") == [CHECKPOINT_NAME]
    assert folders.list("loras") == sorted(LORA_NAMES)
    assert cli.main(argv) == 0  # a checkpoint is present now: nothing written
    assert "1 checkpoint(s) present, demo models not written" in capsys.readouterr().out
