"""SDXL LoRA key layouts and formats against independent computations (oracle README-sdxl, LoRA section).

The mini LoRA's stems are mapped onto the mini checkpoint's shapes (meta device) and compared with
the oracle's own LDM -> diffusers map and ComfyUI's counts (205 UNet, 72 CLIP-L, 192 CLIP-G). Every
other layout is written for small SDXL-structured modules, applied through the patcher at UNet
strength 0.7 and text-encoder strength −0.4, compared per weight with the reference math of
`test_lora_formats` and restored bit-exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_fixtures import dora, kohya, loha, lokr, lora_pair, write
from sdxl_lora_fixtures import mini_shapes, oracle_sdxl, small_ldm_names, small_models
from test_lora_formats import _parts, reference_delta, reference_dora

from nodes.sd.handles import LoraRef
from nodes.sd.lora.coverage import LoraMismatchError, check, coverage
from nodes.sd.lora.loader import decoded, file_stamp, read_lora
from nodes.sd.patcher import apply_stack, restore

S = {"unet": 0.7, "te": -0.4, "te2": -0.4, "te_g": -0.4}
ATTN = "down_blocks.2.attentions.0.transformer_blocks.1"
UNET_MODS = [
    f"{ATTN}.attn1.to_q",
    f"{ATTN}.attn2.to_k",
    "add_embedding.linear_1",
    f"{ATTN}.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
    "up_blocks.0.attentions.2.proj_out",
    "down_blocks.1.resnets.0.conv1",
    "up_blocks.1.upsamplers.0.conv",
    "down_blocks.2.resnets.0.conv_shortcut",
]
TE_MODS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc2"]


@pytest.fixture(scope="module")
def models(oracle_dir: Path) -> dict[str, Any]:
    unet, clip_l, clip_g = small_models(oracle_dir)
    return {"unet": unet, "te": clip_l, "te2": clip_g}


def _g(m: str) -> str:
    """bigG's module path (CLIPTextModelWithProjection keeps the `text_model.` level)."""
    return m if m == "text_projection" else f"text_model.{m}"


def _pairs(model: Any, stems: dict[str, str], dtype: torch.dtype = torch.float16, **names: str) -> dict:
    """LoRA pairs for `stems` (module path -> file stem) with the given part names (default kohya)."""
    gen = torch.Generator().manual_seed(len(stems))
    params = dict(model.named_parameters())
    down, up = names.get("down", ".lora_down.weight"), names.get("up", ".lora_up.weight")
    out: dict[str, torch.Tensor] = {}
    for m, stem in stems.items():
        pair = lora_pair(gen, tuple(params[m + ".weight"].shape), 4, dtype)
        out[stem + down], out[stem + up] = pair["down"], pair["up"]
        if "alpha" not in names:
            out[stem + ".alpha"] = torch.tensor(2.0, dtype=dtype)
    return out


def _apply_and_check(
    path: Path, tensors: dict, models: dict[str, Any], expect: dict[str, tuple[str, str, str]]
) -> Any:
    """Apply to every model; `expect`: param -> (target, file stem, kind "w"/"dora"). Returns the report."""
    stamp = file_stamp(path)
    decs = {t: decoded(path, stamp, m, t) for t, m in models.items()}
    report = coverage(
        read_lora(path, stamp), path.name, decs["unet"], decs.get("te"), decs.get("te2", decs.get("te_g"))
    )
    assert report.complete and report.total_modules == report.matched, report.summary()
    params = {t: dict(m.named_parameters()) for t, m in models.items()}
    base = {(t, n): params[t][n].detach().clone() for n, (t, _, _) in expect.items()}
    for t, m in models.items():
        apply_stack(m, [LoraRef(path, stamp, S[t], path.name)], t)  # type: ignore[arg-type]
    try:
        for name, (t, stem, kind) in expect.items():
            w, got = base[(t, name)], params[t][name].detach()
            p = _parts(tensors, stem)
            want = reference_dora(p, w, S[t]) if kind == "dora" else w + S[t] * reference_delta(p, w)
            if t == "unet":
                err = (got - want).abs().max() / (want - w).abs().max()
                assert err < 1e-5, (name, float(err))
            else:  # merged in fp32, rounded to fp16 once (README-sdxl pitfall 11)
                assert torch.isclose(got, want.half().float(), rtol=2e-3, atol=1e-6).all(), name
                assert torch.equal(got, got.half().float()), f"{name} is not fp16-rounded"
            assert not torch.equal(got, w), f"{name} was not patched"
    finally:
        for m in models.values():
            restore(m)
    for name, (t, _, _) in expect.items():
        assert torch.equal(params[t][name], base[(t, name)]), name
    return report


# ---------------------------------------------------------------- the mini LoRA, as ComfyUI maps it


def test_mini_sdxl_lora_maps_every_module_like_comfyui(oracle_dir: Path, mini_sdxl_loras: Path) -> None:
    unet, clip_l, clip_g = mini_shapes(oracle_dir)
    path = mini_sdxl_loras / "mini_sdxl_lora.safetensors"
    stamp = file_stamp(path)
    decs = [
        decoded(path, stamp, unet, "unet"),
        decoded(path, stamp, clip_l, "te"),
        decoded(path, stamp, clip_g, "te2"),
    ]
    report = coverage(read_lora(path, stamp), path.name, *decs)
    assert (report.unet_modules, report.te_modules, report.te2_modules) == (205, 72, 192)
    assert report.complete and report.matched == report.total_modules == 469
    assert "205 UNet, 72 CLIP-L, 192 CLIP-G" in report.summary()
    assert check(report, "mini_sdxl.safetensors", "sdxl") is None
    # Independent reference: the oracle's LDM -> diffusers map, and HF names for both encoders.
    ldm_to_dif = oracle_sdxl(oracle_dir).unet_ldm_to_diffusers()
    by_stem = {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_"): v
        for k, v in ldm_to_dif.items()
        if k.endswith(".weight")
    }
    groups = read_lora(path, stamp).groups
    want_unet = {by_stem[s] for s in groups if s.startswith("lora_unet_")}
    assert set(decs[0].updates) == want_unet
    te_names = {
        "lora_te1_text_model_" + n.replace(".", "_"): n + ".weight"
        for n, _ in clip_l.named_modules()
        if n.startswith("encoder.layers.")
    }
    assert set(decs[1].updates) == {te_names[s] for s in groups if s.startswith("lora_te1_")}
    g_names = {"lora_te2_" + n.replace(".", "_"): n + ".weight" for n, _ in clip_g.named_modules()}
    assert set(decs[2].updates) == {g_names[s] for s in groups if s.startswith("lora_te2_")}


# ---------------------------------------------------------------- key layouts


def test_kohya_sgm_and_diffusers_unet_names_and_both_encoders(
    oracle_dir: Path, models: dict, tmp_path: Path
) -> None:
    ldm = small_ldm_names(oracle_dir)
    half = len(UNET_MODS) // 2
    stems = {m: "lora_unet_" + ldm[m].replace(".", "_") for m in UNET_MODS[:half]}  # kohya sdxl_train_network
    stems |= {m: "lora_unet_" + m.replace(".", "_") for m in UNET_MODS[half:]}  # kohya diffusers naming
    te1 = {m: "lora_te1_text_model_" + m.replace(".", "_") for m in TE_MODS}
    te2 = {_g(m): "lora_te2_text_model_" + m.replace(".", "_") for m in TE_MODS}
    te2["text_projection"] = "lora_te2_text_projection"  # OneTrainer
    tensors = _pairs(models["unet"], stems) | _pairs(models["te"], te1) | _pairs(models["te2"], te2)
    path = write(tmp_path / "kohya_sdxl.safetensors", tensors)
    expect = {m + ".weight": ("unet", s, "w") for m, s in stems.items()}
    expect |= {m + ".weight": ("te", s, "w") for m, s in te1.items()}
    expect |= {m + ".weight": ("te2", s, "w") for m, s in te2.items()}
    report = _apply_and_check(path, tensors, models, expect)
    assert (report.unet_modules, report.te_modules, report.te2_modules) == (len(stems), 2, 3)


def test_sd1_style_te_names_and_lycoris_simpletuner_names(models: dict, tmp_path: Path) -> None:
    stems = {m: "lycoris_" + m.replace(".", "_") for m in UNET_MODS[:4]}
    te = {m: "lora_te_text_model_" + m.replace(".", "_") for m in TE_MODS}  # `lora_te_` is CLIP-L on SDXL
    tensors = _pairs(models["unet"], stems) | _pairs(models["te"], te)
    path = write(tmp_path / "te_lycoris.safetensors", tensors)
    expect = {m + ".weight": ("unet", s, "w") for m, s in stems.items()}
    expect |= {m + ".weight": ("te", s, "w") for m, s in te.items()}
    report = _apply_and_check(path, tensors, models, expect)
    assert (report.te_modules, report.te2_modules) == (2, 0)


def test_diffusers_peft_layout_with_both_encoders(models: dict, tmp_path: Path) -> None:
    stems = {m: f"unet.{m}" for m in UNET_MODS}  # attention included: nodegraph's extension (oracle README)
    te1 = {m: f"text_encoder.text_model.{m}" for m in TE_MODS}
    te2 = {_g(m): f"text_encoder_2.text_model.{m}" for m in TE_MODS}
    peft = {"down": ".lora_A.weight", "up": ".lora_B.weight", "alpha": "none"}
    tensors = _pairs(models["unet"], stems, **peft) | _pairs(models["te"], te1, **peft)
    tensors |= _pairs(
        models["te2"],
        te2,
        down=".lora_linear_layer.down.weight",
        up=".lora_linear_layer.up.weight",
        alpha="none",
    )
    path = write(tmp_path / "peft_sdxl.safetensors", tensors)
    expect = {m + ".weight": ("unet", s, "w") for m, s in stems.items()}
    expect |= {m + ".weight": ("te", s, "w") for m, s in te1.items()}
    expect |= {m + ".weight": ("te2", s, "w") for m, s in te2.items()}
    report = _apply_and_check(path, tensors, models, expect)
    assert (report.unet_modules, report.te_modules, report.te2_modules) == (len(UNET_MODS), 2, 2)


def test_peft_adapter_names_of_a_wrapped_unet(models: dict, tmp_path: Path) -> None:
    """`PeftModel.save_pretrained` of a diffusers SDXL UNet: `base_model.model.<path>.lora_A/B`, no
    alpha (PEFT's scale is in the config; the file's rank-4 pairs apply at scale 1), attention
    included; the old reference script's `unet.base_model.model.` too."""
    stems = {m: f"base_model.model.{m}" for m in UNET_MODS[:5]}
    stems |= {m: f"unet.base_model.model.{m}" for m in UNET_MODS[5:]}
    tensors = _pairs(models["unet"], stems, down=".lora_A.weight", up=".lora_B.weight", alpha="none")
    path = write(tmp_path / "adapter_model.safetensors", tensors)
    expect = {m + ".weight": ("unet", s, "w") for m, s in stems.items()}
    report = _apply_and_check(path, tensors, {"unet": models["unet"]}, expect)
    assert report.unet_modules == len(UNET_MODS)


def test_refiner_bigg_alone_answers_to_first_encoder_names(models: dict, tmp_path: Path) -> None:
    te = {_g(TE_MODS[0]): "lora_te_text_model_" + TE_MODS[0].replace(".", "_")}
    te[_g(TE_MODS[1])] = "text_encoder.text_model." + TE_MODS[1]
    tensors = _pairs(models["te2"], te)
    path = write(tmp_path / "refiner.safetensors", tensors)
    expect = {m + ".weight": ("te_g", s, "w") for m, s in te.items()}
    report = _apply_and_check(path, tensors, {"unet": models["unet"], "te_g": models["te2"]}, expect)
    assert report.te2_modules == 2 and not report.two_encoders
    # Beside a CLIP-L the same names belong to CLIP-L, and bigG answers only to `lora_te2_`.
    stamp = file_stamp(path)
    assert not decoded(path, stamp, models["te2"], "te2").updates


# ---------------------------------------------------------------- LyCORIS formats on SDXL modules


@pytest.mark.parametrize("fmt", ["loha", "lokr", "locon_mid", "dora"])
def test_lycoris_formats_on_sdxl(fmt: str, oracle_dir: Path, models: dict, tmp_path: Path) -> None:
    unet, clip_l, clip_g = models["unet"], models["te"], models["te2"]
    ldm = small_ldm_names(oracle_dir)
    mods = UNET_MODS
    te2 = [_g(m) for m in TE_MODS]
    g_prefix = "lora_te2_"
    if fmt == "loha":
        tensors = loha(unet, "lora_unet_", mods, 4, 2.0, torch.float16, tucker=True)
        tensors |= loha(clip_g, g_prefix, te2, 4, 2.0, torch.float16)
    elif fmt == "lokr":
        tensors = lokr(unet, "lora_unet_", mods, 4, 2.0, torch.float16)
        tensors |= lokr(clip_g, g_prefix, te2, 4, 2.0, torch.float16, mode="both")
    elif fmt == "dora":
        tensors = dora(unet, "lora_unet_", mods, 4, 2.0, torch.float16)
        tensors |= dora(clip_g, g_prefix, te2, 4, 2.0, torch.float16, on_output=False)
    else:  # LoCon with a Tucker mid on 3x3 convs, kohya SGM names, and CLIP-L
        tensors = kohya(unet, clip_l, mods, TE_MODS, 4, 1.0, torch.float16, mid=True, ldm_names=ldm)
        tensors = {k.replace("lora_te_text_model_", "lora_te1_text_model_"): v for k, v in tensors.items()}
    path = write(tmp_path / f"{fmt}.safetensors", tensors)
    kind = "dora" if fmt == "dora" else "w"
    if fmt == "locon_mid":
        expect = {m + ".weight": ("unet", "lora_unet_" + ldm[m].replace(".", "_"), kind) for m in mods}
        expect |= {m + ".weight": ("te", "lora_te1_text_model_" + m.replace(".", "_"), kind) for m in TE_MODS}
    else:
        expect = {m + ".weight": ("unet", "lora_unet_" + m.replace(".", "_"), kind) for m in mods}
        expect |= {m + ".weight": ("te2", g_prefix + m.replace(".", "_"), kind) for m in te2}
    _apply_and_check(path, tensors, models, expect)


# ---------------------------------------------------------------- family checks


def test_sd15_lora_on_sdxl_and_the_reverse_are_refused_naming_both_files(
    models: dict, mini_loras: Path, mini_sdxl_loras: Path
) -> None:
    sd15 = mini_loras / "mini_lora_a.safetensors"
    stamp = file_stamp(sd15)
    report = coverage(read_lora(sd15, stamp), sd15.name, decoded(sd15, stamp, models["unet"], "unet"), None)
    with pytest.raises(
        LoraMismatchError,
        match=r"mini_lora_a.safetensors is an SD1.5 LoRA; the checkpoint x.safetensors is SDXL",
    ):
        check(report, "x.safetensors", "sdxl")
    xl = mini_sdxl_loras / "mini_sdxl_lora.safetensors"
    stamp = file_stamp(xl)
    report = coverage(read_lora(xl, stamp), xl.name, None, None)
    with pytest.raises(
        LoraMismatchError, match=r"mini_sdxl_lora.safetensors is an SDXL LoRA; the checkpoint y.ckpt is SD1.5"
    ):
        check(report, "y.ckpt", "sd15")
    with pytest.raises(
        LoraMismatchError, match=r"is an SDXL LoRA; the checkpoint r.safetensors is SDXL refiner"
    ):
        check(report, "r.safetensors", "sdxl_refiner")


def test_a_bigg_patched_as_te_uses_its_recorded_role(models: dict, tmp_path: Path) -> None:
    from nodes.sd.handles import ClipHandle
    from nodes.sd.patcher import patched, te_targets

    te2 = {_g(TE_MODS[0]): "lora_te2_text_model_" + TE_MODS[0].replace(".", "_")}
    path = write(tmp_path / "te2.safetensors", _pairs(models["te2"], te2))
    clip = ClipHandle(models["te"], None, "x", "sdxl", text_encoder_2=models["te2"])
    assert [t for _, t in te_targets(clip)] == ["te", "te2"]
    name = _g(TE_MODS[0]) + ".weight"
    before = dict(models["te2"].named_parameters())[name].detach().clone()
    try:
        with patched(models["te2"], [LoraRef(path, file_stamp(path), 1.0, "te2")], target="te"):
            assert not torch.equal(dict(models["te2"].named_parameters())[name], before)
    finally:
        restore(models["te2"])
