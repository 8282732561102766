"""Latent nodes: EmptyLatentImage, LatentUpscale (incl. bislerp), SaveLatent and LoadLatent files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.node import Preview
from nodes.latent import EmptyLatentImage, LatentUpscale, LoadLatent, SaveLatent
from nodes.sd.latent_ops import bislerp


class Ctx:
    def __init__(self, env: Environment) -> None:
        self.node_id = "n"
        self.env = env

    def progress(self, value: int, total: int, preview: Preview | None = None) -> None:
        pass

    def check_interrupt(self) -> None:
        pass

    def warn(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        pass


@pytest.fixture
def env(tmp_path: Path) -> Environment:
    folders = Folders.at(tmp_path)
    folders.output_dir.mkdir(parents=True, exist_ok=True)
    folders.input_dir.mkdir(parents=True, exist_ok=True)
    return Environment(folders)


def test_empty_latent_is_zeros_at_one_eighth(env: Environment) -> None:
    (out,) = EmptyLatentImage().run(Ctx(env), 512, 264, 3)
    assert out["samples"].shape == (3, 4, 33, 64) and out["samples"].dtype == torch.float32
    assert not out["samples"].any()


def test_upscale_passthrough_aspect_and_minimum(env: Environment) -> None:
    src = {"samples": torch.randn(1, 4, 16, 32), "noise_mask": torch.ones(1, 16, 32)}
    (same,) = LatentUpscale().run(Ctx(env), src, "bilinear", 0, 0, "disabled")
    assert same is src
    (derived,) = LatentUpscale().run(Ctx(env), src, "nearest-exact", 512, 0, "disabled")
    assert derived["samples"].shape == (1, 4, 32, 64) and "noise_mask" in derived
    (tiny,) = LatentUpscale().run(Ctx(env), src, "area", 8, 8, "disabled")
    assert tiny["samples"].shape == (1, 4, 8, 8)  # each side at least 64 pixels
    assert src["samples"].shape == (1, 4, 16, 32)  # the input is untouched


def test_center_crop_keeps_the_middle(env: Environment) -> None:
    t = torch.arange(4 * 8, dtype=torch.float32).reshape(1, 1, 4, 8).repeat(1, 4, 1, 1)
    (out,) = LatentUpscale().run(Ctx(env), {"samples": t}, "nearest-exact", 64, 64, "center")
    # 8x4 -> square: the middle 4 columns survive, resized to 8x8
    assert out["samples"].shape == (1, 4, 8, 8)
    assert float(out["samples"][0, 0, 0, 0]) == 2.0


def test_bislerp_identity_and_norm_interpolation() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6)
    assert torch.allclose(bislerp(x, 6, 6), x, atol=1e-5)
    big = bislerp(x, 12, 12)
    assert big.shape == (1, 4, 12, 12) and bool(torch.isfinite(big).all())
    norms, src_norms = big.norm(dim=1), x.norm(dim=1)
    assert float(norms.max()) <= float(src_norms.max()) + 1e-4  # norms are interpolated, never grow


def test_save_latent_writes_comfyui_files(env: Environment) -> None:
    samples = torch.randn(2, 4, 8, 8)
    prompt = {"1": {"class_type": "X", "inputs": {}}}
    first = SaveLatent().run(Ctx(env), {"samples": samples}, "latents/test", prompt, {"workflow": {"a": 1}})
    second = SaveLatent().run(Ctx(env), {"samples": samples}, "latents/test", None, None)
    assert first.ui is not None and second.ui is not None
    assert first.ui["latents"] == [
        {"filename": "test_00001_.latent", "subfolder": "latents", "type": "output"}
    ]
    assert second.ui["latents"][0]["filename"] == "test_00002_.latent"
    path = env.folders.output_dir / "latents" / "test_00001_.latent"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert torch.equal(f.get_tensor("latent_tensor"), samples)
        meta = f.metadata()
    assert json.loads(meta["prompt"]) == prompt and json.loads(meta["workflow"]) == {"a": 1}


def test_save_latent_without_metadata(tmp_path: Path) -> None:
    env = Environment(Folders.at(tmp_path), disable_metadata=True)
    SaveLatent().run(Ctx(env), {"samples": torch.zeros(1, 4, 8, 8)}, "plain", {"p": 1}, None)
    with safe_open(str(env.folders.output_dir / "plain_00001_.latent"), "pt") as f:
        assert not f.metadata()


def test_save_latent_refuses_to_leave_the_output_folder(env: Environment) -> None:
    with pytest.raises(ValueError, match="filename_prefix"):
        SaveLatent().run(Ctx(env), {"samples": torch.zeros(1, 4, 8, 8)}, "../../escape", None, None)


def test_load_latent_round_trip_and_legacy_scale(env: Environment) -> None:
    samples = torch.randn(1, 4, 8, 8)
    SaveLatent().run(Ctx(env), {"samples": samples}, "rt", None, None)
    src = env.folders.output_dir / "rt_00001_.latent"
    (env.folders.input_dir / "rt.latent").write_bytes(src.read_bytes())
    save_file({"latent_tensor": samples * 0.18215}, str(env.folders.input_dir / "old.latent"))
    assert LoadLatent.info(env)["input"]["required"]["latent"][0] == ["old.latent", "rt.latent"]
    (loaded,) = LoadLatent().run(Ctx(env), "rt.latent")
    assert torch.equal(loaded["samples"], samples)
    (legacy,) = LoadLatent().run(Ctx(env), "old.latent")
    assert torch.allclose(legacy["samples"], samples, atol=1e-6)
    assert LoadLatent.fingerprint(env, latent="rt.latent") != LoadLatent.fingerprint(env, latent="old.latent")
    assert LoadLatent.check_inputs(env, latent="rt.latent") is None
    assert "Invalid latent file" in str(LoadLatent.check_inputs(env, latent="missing.latent"))
    assert LoadLatent.check_inputs(env, latent="rt_00001_.latent [output]") is None
