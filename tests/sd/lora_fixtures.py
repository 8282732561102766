"""Generators of LoRA files in every layout the loader reads, and the mini checkpoint as torch modules.

The models are built here from the oracle's mini checkpoint with the oracle's own diffusers configs
and LDM->diffusers name map, so LoRA tests do not depend on the checkpoint loader. Files are written
with random factors of a chosen dtype, in the key layouts the trainers write (oracle README).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.conftest import oracle_module

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@functools.cache
def mini_models(ckpt: Path) -> tuple[Any, Any]:
    """(diffusers UNet fp32, CLIPTextModel fp32) with the mini checkpoint's weights."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    base = oracle_module("make_mini_sd15")
    ucfg = {k: v for k, v in base.diffusers_unet_config().items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**ucfg)
    tcfg = {k: v for k, v in base.clip_text_config().items() if k not in ("architectures", "model_type")}
    te = CLIPTextModel(CLIPTextConfig(**tcfg))
    ldm_map = base.unet_ldm_to_diffusers()
    u_sd: dict[str, torch.Tensor] = {}
    t_sd: dict[str, torch.Tensor] = {}
    with safe_open(str(ckpt), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            if key.startswith("model.diffusion_model."):
                u_sd[ldm_map[key[len("model.diffusion_model.") :]]] = f.get_tensor(key).float()
            elif key.startswith("cond_stage_model.transformer.text_model."):
                t_sd[key[len("cond_stage_model.transformer.text_model.") :]] = f.get_tensor(key).float()
    unet.load_state_dict(u_sd, strict=True)
    missing, unexpected = te.load_state_dict(t_sd, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    return unet.eval().requires_grad_(False), te.eval().requires_grad_(False)


def _rand(gen: torch.Generator, shape: tuple[int, ...], std: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def _shape(model: Any, module: str) -> tuple[int, ...]:
    return tuple(dict(model.named_parameters())[module + ".weight"].shape)


def lora_pair(gen: torch.Generator, shape: tuple[int, ...], rank: int, dtype: torch.dtype) -> dict[str, Any]:
    out_dim, in_dim, *k = shape
    fan = in_dim * (k[0] * k[1] if k else 1)
    return {
        "down": _rand(gen, (rank, in_dim, *k), fan**-0.5, dtype),
        "up": _rand(gen, (out_dim, rank, *((1, 1) if k else ())), 0.2, dtype),
    }


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write .safetensors, or a weights-only .pt for A1111-era files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if path.suffix == ".pt":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path), metadata=metadata)
    return path


def kohya(
    unet: Any,
    te: Any,
    modules: list[str],
    te_modules: list[str],
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    seed: int = 0,
    *,
    mid: bool = False,
    ldm_names: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon keys (`mid`: Tucker `lora_mid` on 3x3 convs; `ldm_names`: LDM stems)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for model, prefix, mods in ((unet, "lora_unet_", modules), (te, "lora_te_text_model_", te_modules)):
        for m in mods:
            shape = _shape(model, m)
            stem = prefix + (ldm_names or {}).get(m, m).replace(".", "_")
            pair = lora_pair(gen, shape, rank, dtype)
            if mid and len(shape) == 4 and shape[2] == 3:
                pair["down"] = _rand(gen, (rank, shape[1], 1, 1), shape[1] ** -0.5, dtype)
                out[stem + ".lora_mid.weight"] = _rand(gen, (rank, rank, 3, 3), 1 / 3, dtype)
            out[stem + ".lora_down.weight"] = pair["down"]
            out[stem + ".lora_up.weight"] = pair["up"]
            out[stem + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def loha(
    model: Any,
    prefix: str,
    modules: list[str],
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    seed: int = 1,
    *,
    tucker: bool = False,
) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa (`hada_w?_a/b`); `tucker`: 3x3 convs get `hada_t?` cores, `[r,out]`/`[r,in]` factors."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        shape = _shape(model, m)
        stem = prefix + m.replace(".", "_")
        fan = int(torch.tensor(shape[1:]).prod())
        for i in ("1", "2"):
            if tucker and len(shape) == 4:
                out[f"{stem}.hada_t{i}"] = _rand(gen, (rank, rank, *shape[2:]), 0.3, dtype)
                out[f"{stem}.hada_w{i}_a"] = _rand(gen, (rank, shape[0]), 0.5, dtype)
                out[f"{stem}.hada_w{i}_b"] = _rand(gen, (rank, shape[1]), fan**-0.25, dtype)
            else:
                out[f"{stem}.hada_w{i}_a"] = _rand(gen, (shape[0], rank), 0.5, dtype)
                out[f"{stem}.hada_w{i}_b"] = _rand(gen, (rank, fan), fan**-0.25, dtype)
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def _factor(n: int) -> tuple[int, int]:
    """LyCORIS-like factorization(dim, -1): the most balanced a·b = n with a <= b."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def lokr(
    model: Any,
    prefix: str,
    modules: list[str],
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    seed: int = 2,
    *,
    mode: str = "w1_full",
) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr. mode: w1_full (full w1, w2_a/b), both (w1_a/b and w2_a/b), full (w1, w2), tucker (t2)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        shape = _shape(model, m)
        stem = prefix + m.replace(".", "_")
        (a, c), (b, d) = _factor(shape[0]), _factor(shape[1])
        k = shape[2:]
        kk = int(torch.tensor(k).prod()) if k else 1
        if mode == "both":
            out[f"{stem}.lokr_w1_a"] = _rand(gen, (a, rank), 0.5, dtype)
            out[f"{stem}.lokr_w1_b"] = _rand(gen, (rank, b), 0.5, dtype)
        else:
            out[f"{stem}.lokr_w1"] = _rand(gen, (a, b), 0.5, dtype)
        if mode == "full":
            out[f"{stem}.lokr_w2"] = _rand(gen, (c, d, *k), 0.1, dtype)
        elif mode == "tucker":
            out[f"{stem}.lokr_t2"] = _rand(gen, (rank, rank, *k), 0.3, dtype)
            out[f"{stem}.lokr_w2_a"] = _rand(gen, (rank, c), 0.3, dtype)
            out[f"{stem}.lokr_w2_b"] = _rand(gen, (rank, d), 0.3, dtype)
        else:
            out[f"{stem}.lokr_w2_a"] = _rand(gen, (c, rank), 0.3, dtype)
            out[f"{stem}.lokr_w2_b"] = _rand(gen, (rank, d * kk), 0.3, dtype)
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def full_diff(
    model: Any, prefix: str, modules: list[str], norms: list[str], dtype: torch.dtype, seed: int = 3
) -> dict[str, torch.Tensor]:
    """LyCORIS full (`diff`, `diff_b`) and train_norm (`w_norm`, `b_norm`)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        stem = prefix + m.replace(".", "_")
        out[f"{stem}.diff"] = _rand(gen, tuple(params[m + ".weight"].shape), 0.02, dtype)
        if m + ".bias" in params:
            out[f"{stem}.diff_b"] = _rand(gen, tuple(params[m + ".bias"].shape), 0.02, dtype)
    for m in norms:
        stem = prefix + m.replace(".", "_")
        out[f"{stem}.w_norm"] = _rand(gen, tuple(params[m + ".weight"].shape), 0.05, dtype)
        out[f"{stem}.b_norm"] = _rand(gen, tuple(params[m + ".bias"].shape), 0.05, dtype)
    return out


def dora(
    model: Any,
    prefix: str,
    modules: list[str],
    rank: int,
    alpha: float,
    dtype: torch.dtype,
    seed: int = 4,
    *,
    on_output: bool = True,
) -> dict[str, torch.Tensor]:
    """kohya LoRA plus `dora_scale`: `[out,1(,1,1)]` (LyCORIS default) or `[1,in(,1,1)]`."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        w = params[m + ".weight"].float()
        stem = prefix + m.replace(".", "_")
        pair = lora_pair(gen, tuple(w.shape), rank, dtype)
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = pair["down"], pair["up"]
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
        if on_output:
            norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        else:
            norm = (
                w.transpose(0, 1)
                .reshape(w.shape[1], -1)
                .norm(dim=1)
                .reshape(1, w.shape[1], *[1] * (w.dim() - 2))
            )
        out[f"{stem}.dora_scale"] = (norm * (1 + 0.2 * torch.rand(norm.shape, generator=gen))).to(dtype)
    return out


def peft(
    unet: Any,
    te: Any,
    modules: list[str],
    te_modules: list[str],
    rank: int,
    dtype: torch.dtype,
    seed: int = 5,
    *,
    unet_style: str = "lora_A",
) -> dict[str, torch.Tensor]:
    """diffusers/PEFT: `unet.<path>.lora_A/B.weight` (or `.lora.down/up`, or the attn-procs form);
    TE `text_encoder.text_model.<path>.lora_linear_layer.down/up.weight`. No alpha."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        pair = lora_pair(gen, _shape(unet, m), rank, dtype)
        if unet_style == "lora_A":
            out[f"unet.{m}.lora_A.weight"], out[f"unet.{m}.lora_B.weight"] = pair["down"], pair["up"]
        elif unet_style == "lora.down":
            out[f"unet.{m}.lora.down.weight"], out[f"unet.{m}.lora.up.weight"] = pair["down"], pair["up"]
        else:  # old attn-procs: attn1.processor.to_q_lora.down.weight
            head, proj = (
                m.rsplit(".", 1) if not m.endswith("to_out.0") else (m[: -len(".to_out.0")], "to_out")
            )
            stem = f"unet.{head}.processor.{proj}"
            out[f"{stem}_lora.down.weight"], out[f"{stem}_lora.up.weight"] = pair["down"], pair["up"]
    for m in te_modules:
        pair = lora_pair(gen, _shape(te, m), rank, dtype)
        stem = f"text_encoder.text_model.{m}.lora_linear_layer"
        out[f"{stem}.down.weight"], out[f"{stem}.up.weight"] = pair["down"], pair["up"]
    return out
