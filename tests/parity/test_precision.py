"""Device and precision: the placement policy, a missing GPU as a startup error, and a whole
workflow (LoRA merge and strength change included) in bf16, the reduced-precision path a GPU takes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nodegraph.cli import main
from nodes.loaders import model_store
from nodes.sd.device import DeviceError, make_placement
from nodes.sd.lora.loader import decoded, file_stamp
from nodes.sd.patcher import branched
from tests.conftest import ORACLE


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_placement_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu(monkeypatch)
    cpu = make_placement()
    assert (cpu.device.type, cpu.unet, cpu.text_encoder, cpu.vae) == ("cpu", *[torch.float32] * 3)
    half = make_placement("cpu", "fp16")
    assert (half.unet, half.text_encoder, half.vae) == (torch.float16, torch.float16, torch.float32)
    assert make_placement("cpu", "bf16").vae == torch.bfloat16
    with pytest.raises(DeviceError, match="--cpu"):
        make_placement("cuda")
    with pytest.raises(DeviceError, match="unsupported device"):
        make_placement("xla")
    with pytest.raises(DeviceError, match="precision"):
        make_placement("cpu", "fp8")
    # A CUDA machine (as torch would report one): fp16 UNet and CLIP, bf16 VAE where supported.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for bf16, vae in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda b=bf16: b)
        gpu = make_placement()
        assert (str(gpu.device), gpu.unet, gpu.text_encoder, gpu.vae) == (
            "cuda:0",
            torch.float16,
            torch.float16,
            vae,
        )
    with pytest.raises(DeviceError, match="only 1 CUDA device"):
        make_placement("cuda:1")


def test_a_missing_gpu_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], engine_base: Path
) -> None:
    _no_gpu(monkeypatch)
    workflow = str(ORACLE / "workflows" / "baseline.json")
    assert main(["run", workflow, "--base-directory", str(engine_base), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "sees no CUDA GPU" in err and "--cpu" in err and "Traceback" not in err


def test_a_lora_workflow_in_bf16(make_engine: Any, engine_base: Path, latent_of: Any) -> None:
    engine = make_engine(precision="bf16")
    prompt = json.loads((ORACLE / "workflows" / "lora_single_a.json").read_text())
    latent = latent_of(engine, prompt, "bf16")
    models = model_store(engine.env).checkpoint(engine_base / "models/checkpoints/mini_sd15.safetensors")
    dtypes = {next(m.parameters()).dtype for m in (models.unet, models.text_encoder, models.vae)}
    assert dtypes == {torch.bfloat16}
    ref = np.load(ORACLE / "refs" / "lora_single_a" / "latent.npy")
    assert latent.dtype == np.float32 and latent.shape == ref.shape and np.isfinite(latent).all()
    psnr = 10 * np.log10(np.abs(ref).max() ** 2 / np.mean((ref.astype(np.float64) - latent) ** 2))
    print("bf16 latent PSNR vs the fp32 ComfyUI ref", psnr)
    assert 30 < psnr < 80, psnr  # the same image at bf16 precision (42.6 dB): close, not fp32-exact
    # As in ComfyUI, the weights are cast to bf16 when placed; a merge is made from them in fp32 and
    # rounded once to bf16.
    lora = engine_base / "models/loras/mini_lora_a.safetensors"
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    update = decoded(lora, file_stamp(lora), models.unet, "unet").updates[name]
    # The file's weight, unpatched (its LDM key; fp16 -> fp32 is exact, as a fp32 load gives it),
    # read alone instead of loading the whole checkpoint a second time in fp32.
    ldm_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    with safe_open(engine_base / "models/checkpoints/mini_sd15.safetensors", "pt") as source:
        base = source.get_tensor(ldm_key).float().to(torch.bfloat16).float()
    want = (base + float(prompt["lora1"]["inputs"]["strength_model"]) * update.delta(base)).to(torch.bfloat16)
    assert torch.equal(dict(models.unet.named_parameters())[name].detach(), want)
    # A strength change runs on branches in bf16 too.
    prompt["lora1"]["inputs"]["strength_model"] = 0.25
    changed = latent_of(engine, prompt, "bf16-changed")
    assert branched(models.unet) > 0 and np.isfinite(changed).all() and not np.array_equal(changed, latent)
