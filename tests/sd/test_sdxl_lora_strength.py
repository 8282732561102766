"""The fast LoRA strength-change path on SDXL (the mini SDXL checkpoint and the oracle's kohya SDXL LoRA).

Handles are made by the LoraLoader node and applied where the sampler and the text encoder apply
them (`patched`, `patched_clip`), as for SD1.5: a strength_model change rewrites no UNet weight
(runtime branches) and, asked again, fuses to exactly the weights of a fresh application; a
strength_clip change of both SDXL encoders gives exactly a fresh application's weights, the
second change reusing the kept ΔW. Weights are compared by digest (the mini UNet's touched
weights alone are 1.8 GB in fp32: two snapshots do not belong in a test on a shared machine).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.lora import LoraLoader
from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.handles import ClipHandle, ModelHandle
from nodes.sd.lora.loader import decoded
from nodes.sd.patcher import branched, patched, patched_clip, restore
from tests.conftest import assert_within_floor

LORA = "mini_sdxl_lora.safetensors"
# bigG at full depth: a strength_clip change keeps every touched TE weight's ΔW in fp32 (2.8 GB for
# the whole mini LoRA), so the text-encoder test uses its layers 0, 1 and the last of each encoder.
TE_LAYERS = ("_layers_0_", "_layers_1_", "_layers_11_", "_layers_31_")


@pytest.fixture(scope="module")
def sdxl(sdxl_store: Any, mini_sdxl_checkpoint: Path) -> LoadedCheckpoint:
    loaded: LoadedCheckpoint = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    return loaded


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, mini_sdxl_loras: Path) -> RecordingContext:
    base = tmp_path_factory.mktemp("sdxl_strength")
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / LORA).symlink_to(mini_sdxl_loras / LORA)
    tensors = load_file(str(mini_sdxl_loras / LORA))
    te_subset = {
        k: v for k, v in tensors.items() if k.startswith("lora_te") and any(s in k for s in TE_LAYERS)
    }
    save_file(te_subset, str(loras / "te_subset.safetensors"))
    return RecordingContext(Environment(Folders.at(base)))


def _handles(sdxl: LoadedCheckpoint) -> tuple[ModelHandle, ClipHandle]:
    model = ModelHandle(sdxl.unet, "mini_sdxl.safetensors", "sdxl")
    clip = ClipHandle(
        sdxl.text_encoder, None, "mini_sdxl.safetensors", "sdxl", text_encoder_2=sdxl.text_encoder_2
    )
    return model, clip


def _digest(module: Any, names: set[str]) -> dict[str, str]:
    params = dict(module.named_parameters())
    return {
        n: hashlib.sha1(params[n].detach().contiguous().view(torch.uint8).numpy()).hexdigest() for n in names
    }


def _run(unet: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=gen)
    ctx = torch.randn((2, 77, 2048), generator=gen)
    added = {"text_embeds": torch.randn((2, 1280), generator=gen), "time_ids": torch.tensor([[64.0] * 6] * 2)}
    with torch.inference_mode():
        out: torch.Tensor = unet(x, torch.tensor([500.0, 20.0]), ctx, added_cond_kwargs=added).sample
        return out.clone()


def test_strength_model_change_branches_then_fuses_to_a_fresh_application(
    sdxl: LoadedCheckpoint, ctx: RecordingContext
) -> None:
    model, clip = _handles(sdxl)
    unet = sdxl.unet
    at_1, _ = LoraLoader().run(ctx, model, clip, LORA, 1.0, 1.0)
    at_04, _ = LoraLoader().run(ctx, model, clip, LORA, -0.4, 1.0)
    ref = at_1.loras[0]
    names = set(decoded(ref.path, ref.stamp, unet, "unet").updates)
    modules = {n.rpartition(".")[0] for n in names}
    assert len(modules) == 205  # every UNet module of the LoRA (linears, 1x1 and 3x3 convs)
    try:
        restore(unet)
        base_out = _run(unet)
        with patched(unet, at_04.loras, target="unet", exact=True):
            fresh_weights, fresh_out = _digest(unet, names), _run(unet)
        restore(unet)
        with patched(unet, at_1.loras, target="unet"):  # first application: fused
            weights_1, out_1 = _digest(unet, names), _run(unet)
        with patched(unet, at_04.loras, target="unet"):  # the change: no weight rewritten
            assert _digest(unet, names) == weights_1
            assert branched(unet) == len(modules)
            out_branch = _run(unet)
        assert_within_floor(out_branch, fresh_out)
        assert (out_1 - fresh_out).abs().max() > 100 * (out_branch - fresh_out).abs().max()
        assert (out_1 - base_out).abs().max() > 0
        with patched(unet, at_04.loras, target="unet"):  # asked again: settled, fused exactly
            assert branched(unet) == 0
            assert _digest(unet, names) == fresh_weights
            assert torch.equal(_run(unet), fresh_out)
    finally:
        restore(unet)


def test_strength_clip_change_of_both_encoders_equals_a_fresh_application(
    sdxl: LoadedCheckpoint, ctx: RecordingContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, clip = _handles(sdxl)
    encoders = {"te": sdxl.text_encoder, "te2": sdxl.text_encoder_2}
    steps = [LoraLoader().run(ctx, model, clip, "te_subset.safetensors", 0.0, s)[1] for s in (1.0, 0.3, -0.7)]
    ref = steps[0].loras[0]
    names = {t: set(decoded(ref.path, ref.stamp, m, t).updates) for t, m in encoders.items()}  # type: ignore[arg-type]
    assert len(names["te"]) == 3 * 6 and len(names["te2"]) == 4 * 6  # CLIP-L 0, 1, 11; bigG 0, 1, 11, 31

    def digests() -> dict[str, dict[str, str]]:
        return {t: _digest(m, names[t]) for t, m in encoders.items()}

    try:
        for m in encoders.values():
            restore(m)
        base = digests()
        fresh = []
        for handle in steps:
            with patched_clip(handle):
                fresh.append(digests())
            for m in encoders.values():
                restore(m)
        for t in encoders:  # each strength changes each encoder's weights
            assert len({str(d[t]) for d in (base, *fresh)}) == 4
        calls: list[int] = []
        real_mm = torch.mm
        for i, handle in enumerate(steps):
            if i == 2:  # the second change adds the kept ΔW: no rank-r product at all
                monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
            with patched_clip(handle):
                assert digests() == fresh[i], f"strength_clip {handle.loras[0].strength}"
            monkeypatch.undo()
        assert calls == []
    finally:
        monkeypatch.undo()
        for m in encoders.values():
            restore(m)
    assert digests() == base
