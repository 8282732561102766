"""Every LoRA format against an independent computation of the merged weight (oracle README formulas).

Each test writes a file in one layout, applies it through the patcher at two strengths (UNet 0.7,
text encoder −0.4), compares every patched parameter with einsum-based reference math written
here from the README, checks the coverage counts, and restores the base weights bit-exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_fixtures import DTYPES, dora, full_diff, kohya, loha, lokr, mini_models, peft, write

from nodes.sd.handles import LoraRef
from nodes.sd.lora.coverage import coverage
from nodes.sd.lora.loader import decoded, file_stamp, read_lora
from nodes.sd.patcher import apply_stack, restore

LINEARS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.resnets.0.time_emb_proj",
]
CONV3 = [
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.0.upsamplers.0.conv",
    "down_blocks.0.downsamplers.0.conv",
]
CONV1 = ["down_blocks.0.attentions.0.proj_in", "up_blocks.0.resnets.0.conv_shortcut"]
TE = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.5.mlp.fc1", "encoder.layers.11.self_attn.out_proj"]
S_UNET, S_TE = 0.7, -0.4


@pytest.fixture(scope="module")
def models(mini_checkpoint: Path) -> tuple[Any, Any]:
    return mini_models(mini_checkpoint)


# ---------------------------------------------------------------- reference math (README table)


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    if w2.dim() == 4:
        a, b = w1.shape
        c, d, k, l_ = w2.shape
        return torch.einsum("ab,cdkl->acbdkl", w1, w2).reshape(a * c, b * d, k, l_)
    (a, b), (c, d) = w1.shape, w2.shape
    return torch.einsum("ab,cd->acbd", w1, w2).reshape(a * c, b * d)


def _tucker(core: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ijkl,jr,ip->prkl", _f(core), _f(b), _f(a))


def reference_delta(p: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """ΔW at strength 1 for one module's parts (suffix -> tensor), independently of nodes.sd.lora."""
    alpha = float(p["alpha"].float()) if "alpha" in p else None
    if "lora_up.weight" in p or "up" in p:
        up, down = _f(p.get("lora_up.weight", p.get("up"))), _f(p.get("lora_down.weight", p.get("down")))
        rank = down.shape[0]
        scale = alpha / rank if alpha is not None else 1.0
        u = up.reshape(up.shape[0], rank)
        if "lora_mid.weight" in p:
            down_eff = torch.einsum("ijyx,jc->icyx", _f(p["lora_mid.weight"]), down.reshape(rank, -1))
            return scale * torch.einsum("oi,icyx->ocyx", u, down_eff)
        return scale * torch.einsum("or,rk->ok", u, down.reshape(rank, -1)).reshape(w.shape)
    if "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            w1 = _tucker(p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            w2 = _tucker(p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        else:
            w1 = torch.einsum("or,ri->oi", _f(p["hada_w1_a"]), _f(p["hada_w1_b"]))
            w2 = torch.einsum("or,ri->oi", _f(p["hada_w2_a"]), _f(p["hada_w2_b"]))
        return (alpha / rank) * (w1 * w2).reshape(w.shape)
    if any(k.startswith("lokr") for k in p):
        rank = None
        w1 = _f(p["lokr_w1"]) if "lokr_w1" in p else _f(p["lokr_w1_a"]) @ _f(p["lokr_w1_b"])
        rank = None if "lokr_w1" in p else p["lokr_w1_b"].shape[0]
        if "lokr_t2" in p:
            w2, rank = _tucker(p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"]), p["lokr_w2_b"].shape[0]
        elif "lokr_w2" in p:
            w2 = _f(p["lokr_w2"])
        else:
            w2, rank = _f(p["lokr_w2_a"]) @ _f(p["lokr_w2_b"]), p["lokr_w2_b"].shape[0]
        scale = alpha / rank if rank is not None and alpha is not None else 1.0
        return scale * _kron(w1, w2).reshape(w.shape)
    return _f(p.get("diff", p.get("w_norm"))).reshape(w.shape)


def reference_dora(p: dict[str, torch.Tensor], w: torch.Tensor, s: float) -> torch.Tensor:
    """LyCORIS/PEFT DoRA (norm of the patched weight on either axis), ComfyUI's strength interpolation."""
    wc = w + reference_delta(p, w)
    m = _f(p["dora_scale"])
    dims = [d for d in range(w.dim()) if d != (0 if m.shape[0] == w.shape[0] else 1)]
    w_dora = wc * m / (torch.sqrt((wc * wc).sum(dim=dims, keepdim=True)) + torch.finfo(torch.float32).eps)
    return w + s * (w_dora - w)


# ---------------------------------------------------------------- the harness


_PAIR_NAMES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
}


def _parts(tensors: dict[str, torch.Tensor], stem: str) -> dict[str, torch.Tensor]:
    """A module's tensors by part name (PEFT/diffusers pair names read as up/down)."""
    out = {}
    for k, v in tensors.items():
        rest = k[len(stem) :]
        if k.startswith(stem) and (
            rest in _PAIR_NAMES or (rest.startswith(".") and "." not in rest[1:].replace(".weight", ""))
        ):
            out[_PAIR_NAMES.get(rest, rest[1:])] = v
    return out


def _check(
    path: Path,
    tensors: dict[str, torch.Tensor],
    models: tuple[Any, Any],
    expect: dict[str, tuple[str, str, str]],
) -> None:
    """Apply at (S_UNET, S_TE); `expect`: param -> (target, file stem, kind "w"/"b"/"dora")."""
    unet, te = models
    stamp = file_stamp(path)
    modules = {"unet": unet, "te": te}
    report = _report(path, models)  # every module of every format is matched and applied
    counts = {t: len({n.rsplit(".", 1)[0] for n, (tt, _, _) in expect.items() if tt == t}) for t in modules}
    assert (report.unet_modules, report.te_modules) == (counts["unet"], counts["te"])
    assert report.complete and report.total_modules == report.matched, report.summary()
    base = {n: dict(modules[t].named_parameters())[n].detach().clone() for n, (t, _, _) in expect.items()}
    for target, s in (("unet", S_UNET), ("te", S_TE)):
        apply_stack(modules[target], [LoraRef(path, stamp, s, path.name)], target)  # type: ignore[arg-type]
    try:
        for name, (target, stem, kind) in expect.items():
            s = S_UNET if target == "unet" else S_TE
            w = base[name]
            p = _parts(tensors, stem)
            if kind == "dora":
                want = reference_dora(p, w, s)
            elif kind == "b":
                want = w + s * _f(p.get("diff_b", p.get("b_norm")))
            else:
                want = w + s * reference_delta(p, w)
            got = dict(modules[target].named_parameters())[name].detach()
            if target == "te":
                want = want.half().float()
                close = torch.isclose(got, want, rtol=2e-3, atol=1e-6)
                assert close.all() and (got == want).float().mean() > 0.99, name
            else:
                err = (got - want).abs().max() / (want - w).abs().max()
                assert err < 1e-5, (name, float(err))
            assert not torch.equal(got, w), f"{name} was not patched"
    finally:
        restore(unet)
        restore(te)
    for name, (target, _, _) in expect.items():
        assert torch.equal(dict(modules[target].named_parameters())[name], base[name]), name


def _report(path: Path, models: tuple[Any, Any]) -> Any:
    stamp = file_stamp(path)
    return coverage(
        read_lora(path, stamp),
        path.name,
        decoded(path, stamp, models[0], "unet"),
        decoded(path, stamp, models[1], "te"),
    )


def _kohya_expect(modules: list[str], te_modules: list[str], stems: dict[str, str] | None = None):
    out = {
        m + ".weight": ("unet", "lora_unet_" + (stems or {}).get(m, m).replace(".", "_"), "w")
        for m in modules
    }
    out |= {m + ".weight": ("te", "lora_te_text_model_" + m.replace(".", "_"), "w") for m in te_modules}
    return out


# ---------------------------------------------------------------- the formats


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_kohya_lora_linear_and_locon(dtype: str, models: Any, tmp_path: Path) -> None:
    mods = LINEARS + CONV3 + CONV1
    tensors = kohya(*models, mods, TE, rank=4, alpha=2.0, dtype=DTYPES[dtype])
    path = write(tmp_path / f"kohya_{dtype}.safetensors", tensors)
    _check(path, tensors, models, _kohya_expect(mods, TE))
    report = _report(path, models)
    assert (report.unet_modules, report.te_modules, report.unmatched) == (len(mods), len(TE), ())


def test_kohya_ldm_names_map_to_the_same_modules(models: Any, tmp_path: Path) -> None:
    # The oracle generator's own LDM -> diffusers map is the independent reference.
    from tests.conftest import oracle_module

    ldm_to_diffusers = oracle_module("make_mini_sd15").unet_ldm_to_diffusers()
    inverse = {d.rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k, d in ldm_to_diffusers.items()}
    mods = [
        LINEARS[0],
        *CONV3,
        CONV1[1],
        "up_blocks.1.attentions.1.proj_out",
        "mid_block.resnets.1.conv2",
        "time_embedding.linear_2",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    ]
    ldm = {m: inverse[m] for m in mods}
    tensors = kohya(*models, mods, [], rank=4, alpha=4.0, dtype=torch.float16, ldm_names=ldm)
    path = write(tmp_path / "ldm.safetensors", tensors)
    _check(path, tensors, models, _kohya_expect(mods, [], ldm))


def test_locon_with_tucker_mid(models: Any, tmp_path: Path) -> None:
    mods = CONV3 + LINEARS[:2]
    tensors = kohya(*models, mods, [], rank=4, alpha=1.0, dtype=torch.float16, mid=True)
    assert any(k.endswith("lora_mid.weight") for k in tensors)
    path = write(tmp_path / "locon_mid.safetensors", tensors)
    _check(path, tensors, models, _kohya_expect(mods, []))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("tucker", [False, True])
def test_loha(dtype: str, tucker: bool, models: Any, tmp_path: Path) -> None:
    unet, te = models
    tensors = loha(unet, "lora_unet_", LINEARS + CONV3, 4, 2.0, DTYPES[dtype], tucker=tucker)
    tensors |= loha(te, "lora_te_text_model_", TE, 4, 2.0, DTYPES[dtype], seed=9)
    path = write(tmp_path / f"loha_{dtype}_{tucker}.safetensors", tensors)
    _check(path, tensors, models, _kohya_expect(LINEARS + CONV3, TE))


@pytest.mark.parametrize("mode", ["w1_full", "both", "full", "tucker"])
def test_lokr(mode: str, models: Any, tmp_path: Path) -> None:
    unet, te = models
    mods = CONV3[:1] if mode == "tucker" else LINEARS + CONV3[:1] + CONV1
    tensors = lokr(unet, "lora_unet_", mods, 4, 8.0, torch.float16, mode=mode)
    te_mods = [] if mode == "tucker" else TE
    tensors |= lokr(te, "lora_te_text_model_", te_mods, 4, 8.0, torch.float16, seed=7, mode=mode)
    path = write(tmp_path / f"lokr_{mode}.safetensors", tensors)
    _check(path, tensors, models, _kohya_expect(mods, te_mods))


def test_full_diff_with_biases_and_norms(models: Any, tmp_path: Path) -> None:
    unet, te = models
    mods = [LINEARS[3], CONV3[0], "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"]
    norms = ["down_blocks.0.resnets.0.norm2", "down_blocks.0.attentions.0.transformer_blocks.0.norm2"]
    tensors = full_diff(unet, "lora_unet_", mods, norms, torch.float16)
    tensors |= full_diff(
        te, "lora_te_text_model_", TE[:1], ["encoder.layers.3.layer_norm1"], torch.float16, 8
    )
    path = write(tmp_path / "full.safetensors", tensors)
    expect = {}
    for model, target, prefix, names in (
        (unet, "unet", "lora_unet_", mods + norms),
        (te, "te", "lora_te_text_model_", TE[:1] + ["encoder.layers.3.layer_norm1"]),
    ):
        params = dict(model.named_parameters())
        for m in names:
            stem = prefix + m.replace(".", "_")
            expect[m + ".weight"] = (target, stem, "w")
            if m + ".bias" in params:
                expect[m + ".bias"] = (target, stem, "b")
    _check(path, tensors, models, expect)
    report = _report(path, models)
    biases = [t for t, _, kind in expect.values() if kind == "b"]
    assert (report.unet_biases, report.te_biases) == (biases.count("unet"), biases.count("te")) == (5, 2)
    assert (report.unet_modules, report.te_modules, report.unmatched) == (5, 2, ())


@pytest.mark.parametrize("on_output", [True, False])
def test_dora(on_output: bool, models: Any, tmp_path: Path) -> None:
    unet, te = models
    mods = LINEARS + CONV3[:1] + CONV1[:1]
    tensors = dora(unet, "lora_unet_", mods, 8, 4.0, torch.float16, on_output=on_output)
    tensors |= dora(te, "lora_te_text_model_", TE, 8, 4.0, torch.float16, seed=11, on_output=on_output)
    path = write(tmp_path / f"dora_{on_output}.safetensors", tensors)
    expect = {k: (t, s, "dora") for k, (t, s, _) in _kohya_expect(mods, TE).items()}
    _check(path, tensors, models, expect)


@pytest.mark.parametrize("style", ["lora_A", "lora.down", "processor"])
def test_peft_and_diffusers_layouts_including_attention(style: str, models: Any, tmp_path: Path) -> None:
    attn = [m for m in LINEARS if ".attn" in m] + [
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"
    ]
    mods = attn if style == "processor" else LINEARS + CONV3[:1] + CONV1[:1]
    tensors = peft(*models, mods, TE, 4, torch.float16, unet_style=style)
    path = write(tmp_path / f"peft_{style}.safetensors", tensors)
    expect = {m + ".weight": ("unet", _peft_stem(m, style), "w") for m in mods}
    expect |= {m + ".weight": ("te", f"text_encoder.text_model.{m}", "w") for m in TE}
    _check(path, tensors, models, expect)
    report = _report(path, models)
    assert (report.unet_modules, report.te_modules, report.unmatched) == (len(mods), len(TE), ())


def _peft_stem(m: str, style: str) -> str:
    if style != "processor":
        return f"unet.{m}"
    head, proj = (m[: -len(".to_out.0")], "to_out") if m.endswith("to_out.0") else m.rsplit(".", 1)
    return f"unet.{head}.processor.{proj}"


def test_a1111_pt_file(models: Any, tmp_path: Path) -> None:
    tensors = kohya(*models, LINEARS[:2], TE[:1], rank=4, alpha=4.0, dtype=torch.float16)
    path = write(tmp_path / "old.pt", tensors)
    _check(path, tensors, models, _kohya_expect(LINEARS[:2], TE[:1]))
