"""LoRA nodes: the ComfyUI LoraLoader contract, coverage warnings, family refusal, prompt tags."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.lora import LoraLoader, LoraLoaderModelOnly, LoraTagLoader
from nodes.sd.handles import ClipHandle, ModelHandle
from nodes.sd.lora.coverage import LoraMismatchError
from nodes.sd.patcher import patched, restore
from tests.sd.lora_fixtures import mini_models

CKPT = "mini_sd15.safetensors"


@pytest.fixture(scope="module")
def handles(mini_checkpoint: Path) -> tuple[ModelHandle, ClipHandle]:
    unet, te = mini_models(mini_checkpoint)
    return ModelHandle(unet, CKPT, "sd15"), ClipHandle(te, None, CKPT, "sd15")


@pytest.fixture
def ctx(tmp_path: Path, mini_loras: Path) -> RecordingContext:
    folders = Folders.at(tmp_path)
    loras = tmp_path / "models" / "loras"
    (loras / "sub").mkdir(parents=True)
    shutil.copy(mini_loras / "mini_lora_a.safetensors", loras / "mini_lora_a.safetensors")
    shutil.copy(mini_loras / "mini_lora_b.safetensors", loras / "sub" / "Mini_Lora_B.safetensors")
    return RecordingContext(Environment(folders))


def _loras(ctx: RecordingContext) -> Path:
    return ctx.env.folders.paths("loras")[0]


def test_both_strengths_zero_returns_the_inputs(ctx: RecordingContext, handles: Any) -> None:
    model, clip = handles
    out = LoraLoader().run(ctx, model, clip, "missing.safetensors", 0.0, 0.0)
    assert out[0] is model and out[1] is clip


def test_loader_adds_refs_and_one_zero_side_stays_unchanged(ctx: RecordingContext, handles: Any) -> None:
    model, clip = handles
    m1, c1 = LoraLoader().run(ctx, model, clip, "mini_lora_a.safetensors", 0.8, 0.0)
    assert [r.strength for r in m1.loras] == [0.8] and c1 is clip
    m2, c2 = LoraLoader().run(ctx, m1, c1, "sub/Mini_Lora_B.safetensors", -2.5, 1.5)
    assert [(r.name, r.strength) for r in m2.loras] == [
        ("mini_lora_a.safetensors", 0.8),
        ("sub/Mini_Lora_B.safetensors", -2.5),
    ]
    assert [r.strength for r in c2.loras] == [1.5] and model.loras == () and ctx.warnings == []


def test_chained_negative_and_model_only_give_comfyui_math(ctx: RecordingContext, handles: Any) -> None:
    model, clip = handles
    m, c = LoraLoader().run(ctx, model, clip, "mini_lora_a.safetensors", 1.0, -0.5)
    (m,) = LoraLoaderModelOnly().run(ctx, m, "sub/Mini_Lora_B.safetensors", -0.7)
    sa = load_file(str(_loras(ctx) / "mini_lora_a.safetensors"))
    sb = load_file(str(_loras(ctx) / "sub" / "Mini_Lora_B.safetensors"))

    def delta(sd: dict[str, torch.Tensor], stem: str, shape: torch.Size) -> torch.Tensor:
        down, up = sd[stem + ".lora_down.weight"].float(), sd[stem + ".lora_up.weight"].float()
        return (
            float(sd[stem + ".alpha"].float())
            / down.shape[0]
            * (up.flatten(1) @ down.flatten(1)).reshape(shape)
        )

    uname = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    ustem = "lora_unet_" + uname.replace(".", "_")
    w = dict(model.unet.named_parameters())[uname + ".weight"].detach().clone()
    want = w + 1.0 * delta(sa, ustem, w.shape) - 0.7 * delta(sb, ustem, w.shape)
    tname = "encoder.layers.4.mlp.fc2.weight"
    t = dict(clip.text_encoder.named_parameters())[tname].detach().clone()
    want_t = (t - 0.5 * delta(sa, "lora_te_text_model_encoder_layers_4_mlp_fc2", t.shape)).half().float()
    with patched(m.unet, m.loras, target="unet"), patched(c.text_encoder, c.loras, target="te"):
        got = dict(m.unet.named_parameters())[uname + ".weight"].detach().clone()
        got_t = dict(c.text_encoder.named_parameters())[tname].detach().clone()
    restore(m.unet)
    restore(c.text_encoder)
    assert (got - want).abs().max() <= 1e-5 * (want - w).abs().max()
    assert torch.allclose(got_t, want_t, rtol=2e-3, atol=1e-7) and not torch.equal(got_t, t)


def test_model_only_skips_te_modules_without_a_warning(ctx: RecordingContext, handles: Any) -> None:
    (m,) = LoraLoaderModelOnly().run(ctx, handles[0], "mini_lora_a.safetensors", 1.0)
    assert len(m.loras) == 1 and ctx.warnings == []


def _write_variant(
    ctx: RecordingContext, name: str, extra: dict[str, torch.Tensor], meta: dict[str, str] | None = None
) -> str:
    sd = load_file(str(_loras(ctx) / "mini_lora_a.safetensors"))
    save_file(sd | extra, str(_loras(ctx) / name), metadata=meta)
    return name


def test_partly_matched_lora_gives_one_warning_with_counts(ctx: RecordingContext, handles: Any) -> None:
    extra = {f"lora_unet_no_such_block_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(30)}
    name = _write_variant(ctx, "partial.safetensors", extra | {"weird_key": torch.zeros(1)})
    LoraLoader().run(ctx, *handles, name, 1.0, 1.0)
    assert len(ctx.warnings) == 1
    message, details = ctx.warnings[0]
    assert "124 of 154 modules matched" in message and "31 keys did not match" in message
    assert details is not None and details["unet_modules"] == 52 and len(details["unmatched"]) == 31


def test_wrong_family_is_refused_naming_both_files(ctx: RecordingContext, handles: Any) -> None:
    # An SDXL-shaped file whose first-level names also exist in SD1.5 (so some keys would map).
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    sd = {
        f"{stem}.lora_down.weight": torch.zeros(4, 640),
        f"{stem}.lora_up.weight": torch.zeros(640, 4),
        "lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.zeros(4, 1280, 3, 3),
        "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": torch.zeros(1280, 4, 1, 1),
    }
    name = "sdxl_thing.safetensors"
    save_file(sd, str(_loras(ctx) / name), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(
        LoraMismatchError,
        match=r"sdxl_thing\.safetensors is an SDXL LoRA; the checkpoint "
        r"mini_sd15\.safetensors is SD1\.5",
    ):
        LoraLoader().run(ctx, *handles, name, 1.0, 1.0)


def test_mislabelled_metadata_is_overruled_by_keys_that_fit(ctx: RecordingContext, handles: Any) -> None:
    name = _write_variant(ctx, "labelled_xl.safetensors", {}, {"ss_base_model_version": "sdxl_base_v1-0"})
    model, _ = LoraLoader().run(ctx, *handles, name, 1.0, 1.0)
    assert len(model.loras) == 1 and len(ctx.warnings) == 1
    assert "metadata calls it an SDXL LoRA, but its keys fit this SD1.5 checkpoint" in ctx.warnings[0][0]


def test_sdxl_keys_without_metadata_are_recognised(ctx: RecordingContext, handles: Any) -> None:
    sd = {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4),
    }
    save_file(sd, str(_loras(ctx) / "xl.safetensors"))
    with pytest.raises(LoraMismatchError, match="xl.safetensors is an SDXL LoRA"):
        LoraLoader().run(ctx, *handles, "xl.safetensors", 1.0, 1.0)


def test_nothing_matched_is_an_error_naming_both_files(ctx: RecordingContext, handles: Any) -> None:
    save_file({"foo.lora_down.weight": torch.zeros(2, 2)}, str(_loras(ctx) / "odd.safetensors"))
    with pytest.raises(LoraMismatchError, match=r"odd\.safetensors does not fit the checkpoint mini_sd15"):
        LoraLoaderModelOnly().run(ctx, handles[0], "odd.safetensors", 1.0)


def test_fingerprint_follows_the_file(ctx: RecordingContext) -> None:
    before = LoraLoader.input("lora_name").fingerprint(ctx.env, "mini_lora_a.safetensors")
    path = _loras(ctx) / "mini_lora_a.safetensors"
    path.write_bytes(path.read_bytes() + b" ")
    assert (
        before is not None
        and LoraLoader.input("lora_name").fingerprint(ctx.env, "mini_lora_a.safetensors") != before
    )


def test_tag_loader_applies_tags_in_order_and_strips_them(ctx: RecordingContext, handles: Any) -> None:
    text = "a cat <lora:mini_lora_a:0.8>, on a chair <lora:mini_lora_b:0.5:-1> , red <lyco:MINI_LORA_A>"
    m, c, cleaned = LoraTagLoader().run(ctx, *handles, text)
    assert cleaned == "a cat, on a chair, red"
    assert [(r.path.name, r.strength) for r in m.loras] == [
        ("mini_lora_a.safetensors", 0.8),
        ("Mini_Lora_B.safetensors", -1.0),
        ("mini_lora_a.safetensors", 1.0),
    ]
    assert [r.strength for r in c.loras] == [0.8, 0.5, 1.0]


def test_tag_loader_unknown_lora_names_the_tag(ctx: RecordingContext, handles: Any) -> None:
    with pytest.raises(ValueError, match=r"<lora:nope:1>"):
        LoraTagLoader().run(ctx, *handles, "x <lora:nope:1>")
    assert "<lora:nope:1>" in (LoraTagLoader.check_inputs(ctx.env, text="<lora:nope:1>") or "")
    assert LoraTagLoader.check_inputs(ctx.env, text="<lora:mini_lora_a:1>") is None
