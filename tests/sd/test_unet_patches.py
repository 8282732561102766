"""FreeU, FreeU_V2, RescaleCFG and PAG against ComfyUI's formulas on small tensors and a tiny random
diffusers UNet shaped like the mini SD1.5 one (two levels, attention at level 0 and in the middle)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodes import all_nodes
from nodes.sd import cfg_patches, unet_patches
from nodes.sd.unet_patches import FreeU, PerturbedAttention, RescaleCFG, fourier_filter, freeu_output_block


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def comfy_fourier(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    x_freq = torch.fft.fftn(x.float(), dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))
    b, c, h, w = x_freq.shape
    mask = torch.ones((b, c, h, w))
    crow, ccol = h // 2, w // 2
    mask[..., crow - threshold : crow + threshold, ccol - threshold : ccol + threshold] = scale
    x_freq = torch.fft.ifftshift(x_freq * mask, dim=(-2, -1))
    filtered: torch.Tensor = torch.fft.ifftn(x_freq, dim=(-2, -1)).real
    return filtered.to(x.dtype)


def test_freeu_v2_output_block_is_comfyuis() -> None:
    h, hsp = rand(2, 64, 6, 6, seed=1), rand(2, 64, 6, 6, seed=2)
    got_h, got_hsp = freeu_output_block(FreeU(1.3, 1.4, 0.9, 0.2, v2=True), 32, h, hsp)
    mean = h.mean(1).unsqueeze(1)
    top = torch.max(mean.view(2, -1), dim=-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
    low = torch.min(mean.view(2, -1), dim=-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
    mean = (mean - low) / (top - low)
    want = h.clone()
    want[:, :32] = want[:, :32] * ((1.4 - 1) * mean + 1)  # 64 = 2 x model_channels: b2, s2
    assert torch.equal(got_h, want) and torch.equal(got_hsp, comfy_fourier(hsp, 1, 0.2))
    untouched = freeu_output_block(FreeU(1.3, 1.4, 0.9, 0.2, v2=True), 32, rand(1, 96, 4, 4), hsp)
    assert torch.equal(untouched[1], hsp)  # no rule for 96 channels
    assert torch.equal(fourier_filter(hsp, 1, 0.2), comfy_fourier(hsp, 1, 0.2))


def _run(unet: Any, patches: list[Any]) -> torch.Tensor:
    x, ctx = rand(1, 4, 8, 8, seed=3), rand(1, 5, 16, seed=4)
    with torch.no_grad(), unet_patches.applied(unet, patches):
        out: torch.Tensor = unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx).sample
    return out


@pytest.mark.parametrize("v2", [False, True])
def test_freeu_hooks_act_where_comfyui_does(unet: Any, monkeypatch: pytest.MonkeyPatch, v2: bool) -> None:
    import diffusers.models.unets.unet_2d_blocks as blocks

    patch = FreeU(b1=1.7, b2=1.5, s1=0.3, s2=0.6, v2=v2)
    plain = _run(unet, [])
    ours = _run(unet, [patch])
    # The reference: diffusers' own FreeU call site (it hands over the true h and skip of each up-block
    # resnet), with ComfyUI's width-keyed output_block_patch in place of diffusers' per-resolution one.
    # Here h is 64 = 2 x 32 channels in up block 0 and in up block 1's first resnet: (b2, s2) there.
    seen: list[int] = []

    def comfy_patch(resolution_idx: int, h: torch.Tensor, hsp: torch.Tensor, **_: Any) -> Any:
        seen.append(h.shape[1])
        return freeu_output_block(patch, 32, h, hsp)

    monkeypatch.setattr(blocks, "apply_freeu", comfy_patch)
    unet.enable_freeu(s1=1.0, s2=1.0, b1=1.0, b2=1.0)  # switches the call site on
    try:
        with torch.no_grad():
            theirs = unet(
                rand(1, 4, 8, 8, seed=3), torch.tensor([500.0]), encoder_hidden_states=rand(1, 5, 16, seed=4)
            )
    finally:
        unet.disable_freeu()
    assert seen == [64, 64, 64, 32]
    assert torch.equal(ours, theirs.sample)
    assert (ours - plain).abs().max() > 1e-3
    assert torch.equal(_run(unet, []), plain)  # the hooks are gone after the run
    assert not hasattr(unet, unet_patches.PATCHES_ATTR)


def comfy_rescale(
    multiplier: float, x_orig: torch.Tensor, sigma: torch.Tensor, c: Any, u: Any, scale: float
) -> Any:
    """nodes_model_advanced.RescaleCFG's rescale_cfg, args built as samplers.cfg_function builds them."""
    cond, uncond = x_orig - c, x_orig - u
    sigma = sigma.view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
    x = x_orig / (sigma * sigma + 1.0)
    cond = ((x - (x_orig - cond)) * (sigma**2 + 1.0) ** 0.5) / (sigma)
    uncond = ((x - (x_orig - uncond)) * (sigma**2 + 1.0) ** 0.5) / (sigma)
    x_cfg = uncond + scale * (cond - uncond)
    ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_rescaled = x_cfg * (ro_pos / ro_cfg)
    x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
    return x_orig - (x_orig - (x - x_final * sigma / (sigma * sigma + 1.0) ** 0.5))


def test_rescale_cfg_is_comfyuis(unet: Any) -> None:
    x, c, u = rand(2, 4, 5, 5, seed=5), rand(2, 4, 5, 5, seed=6), rand(2, 4, 5, 5, seed=7)
    sigma = torch.tensor([3.5, 3.5])
    want = comfy_rescale(0.7, x, sigma, c, u, 7.5)
    with unet_patches.applied(unet, [RescaleCFG(0.7)]):
        got = cfg_patches.guided(unet, x, sigma, c, u, 7.5, lambda: c)
    assert torch.equal(got, want)


def test_pag_adds_the_perturbed_pass_after_cfg(unet: Any) -> None:
    x, c, u = rand(1, 4, 8, 8, seed=8), rand(1, 4, 8, 8, seed=9), rand(1, 4, 8, 8, seed=10)
    ctx = rand(1, 5, 16, seed=4)

    def cond_pass() -> torch.Tensor:
        out: torch.Tensor = unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx).sample
        return out

    with torch.no_grad(), unet_patches.applied(unet, [PerturbedAttention(3.0)]):
        got = cfg_patches.guided(unet, x, torch.tensor([2.0]), c, u, 7.0, cond_pass)
        normal = cond_pass()  # the processors are restored after the PAG pass
    # the perturbed pass by hand: the middle block's attn1 output is to_out(to_v(x))
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    original = layer.forward
    layer.forward = lambda hidden, *a, **k: layer.to_out[1](layer.to_out[0](layer.to_v(hidden)))
    try:
        with torch.no_grad():
            pag = cond_pass()
    finally:
        layer.forward = original
    assert torch.allclose(got, u + (c - u) * 7.0 + (c - pag) * 3.0, atol=1e-6)
    assert (pag - normal).abs().max() > 1e-4
    assert torch.equal(cfg_patches.guided(unet, x, torch.tensor([2.0]), c, None, 1.0, cond_pass), c)


def test_patch_nodes_declare_comfyuis_inputs() -> None:
    by_id = {cls.NODE_ID: cls for cls in all_nodes()}
    free = by_id["FreeU_V2"].info(None)["input"]["required"]
    assert [(k, v[1]["default"]) for k, v in free.items() if k != "model"] == [
        ("b1", 1.3), ("b2", 1.4), ("s1", 0.9), ("s2", 0.2),
    ]  # fmt: skip
    assert free["b1"][1] | {"default": 0} == {"default": 0, "min": 0.0, "max": 10.0, "step": 0.01}
    v1 = by_id["FreeU"].info(None)["input"]["required"]
    assert [v1[k][1]["default"] for k in ("b1", "b2", "s1", "s2")] == [1.1, 1.2, 0.9, 0.2]
    assert by_id["RescaleCFG"].info(None)["input"]["required"]["multiplier"][1] == {
        "default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01,
    }  # fmt: skip
    pag = by_id["PerturbedAttentionGuidance"].info(None)
    assert pag["input"]["required"]["scale"][1] == {
        "default": 3.0,
        "min": 0.0,
        "max": 100.0,
        "step": 0.01,
        "round": 0.01,
    }
    assert pag["category"] == by_id["FreeU"].info(None)["category"] == "model_patches/unet"
