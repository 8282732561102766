"""The ControlNet model and its residuals against ComfyUI's (refs-nodes/cn_apply/control_first_call.npz),
the chain and step-range rules, and the loader's refusals."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nodes.sd.cond_entries import CondEntry, percent_to_sigma, prepare_sides
from nodes.sd.control import Control, broadcast_image_to, residuals
from nodes.sd.controlnet import ControlModel, ControlNetError, load_controlnet
from nodes.sd.model_sampling import EPS
from tests.conftest import ORACLE, assert_within_floor

REFS = ORACLE / "refs-nodes"
SCHEDULE = EPS.schedule


@pytest.fixture(scope="module")
def net(mini_controlnet: Path) -> ControlModel:
    return load_controlnet(mini_controlnet)


@pytest.fixture(scope="module")
def hint() -> torch.Tensor:
    rgb = (
        np.asarray(Image.open(ORACLE / "workflows-nodes" / "hint_64.png").convert("RGB"), np.float32) / 255.0
    )
    return torch.from_numpy(rgb)[None].movedim(-1, 1)


def _first_call() -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ComfyUI's first controlled call of cn_apply: residuals, scaled x, sigmas, [uncond, cond] context."""
    ref = np.load(REFS / "cn_apply" / "control_first_call.npz")
    sigma = torch.from_numpy(ref["sigma"])
    x = torch.from_numpy(np.load(REFS / "cn_apply" / "step_x.npy"))[0].repeat(2, 1, 1, 1)
    pos, neg = (torch.from_numpy(np.load(REFS / "nodes_baseline" / f"cond_{s}.npy")) for s in ("pos", "neg"))
    x_in = x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    return ref, x_in, sigma, torch.cat([neg, pos])


def _run(control: Control, x_in: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> Any:
    """(residuals per skip connection, middle residual), or None when no ControlNet is active."""
    with torch.inference_mode():
        found = residuals(
            control,
            x_in,
            SCHEDULE.timestep(sigma).float(),
            float(sigma[0]),
            context,
            None,
            2,
            lambda p: percent_to_sigma(SCHEDULE, p),
        )
    return None if found is None else (found["output"], found["middle"][0])


def test_residuals_match_comfyui(net: ControlModel, hint: torch.Tensor) -> None:
    ref, x_in, sigma, context = _first_call()
    down, mid = _run(Control(net, hint, 0.8), x_in, sigma, context)
    assert len(down) == 4
    for i, got in enumerate(down):
        assert_within_floor(got, ref[f"output_{i}"])
    assert_within_floor(mid, ref["middle_0"])


def test_a_chain_adds_the_scaled_residuals_and_skips_what_is_out_of_range(
    net: ControlModel, hint: torch.Tensor
) -> None:
    _, x_in, sigma, context = _first_call()  # sigma 14.61: the first step
    alone = _run(Control(net, hint, 1.0), x_in, sigma, context)
    late = Control(net, hint.flip(-1), 0.5, start_percent=0.1)  # starts at sigma 8.3: off at 14.6
    chained = Control(net, hint, 0.3, previous=Control(net, hint, 0.7, previous=late))
    got = _run(chained, x_in, sigma, context)
    for a, b in zip([*got[0], got[1]], [*alone[0], alone[1]], strict=True):
        assert_within_floor(a, b)  # 0.7 r + 0.3 r, the late one passing its predecessor's (none) on
    assert _run(late, x_in, sigma, context) is None


def test_percent_bounds_are_inclusive_fp32_sigmas() -> None:
    assert percent_to_sigma(SCHEDULE, 0.6) == pytest.approx(1.1628646, abs=1e-6)
    assert percent_to_sigma(SCHEDULE, 0.8) == pytest.approx(0.5711889, abs=1e-6)
    assert percent_to_sigma(SCHEDULE, 0.0) > 1e8 and percent_to_sigma(SCHEDULE, 1.0) == 0.0


def test_hint_batches_spread_over_each_batched_entry() -> None:
    hints = torch.arange(3.0).reshape(3, 1, 1, 1)
    assert broadcast_image_to(hints[:1], 4, 2).shape[0] == 1  # one hint broadcasts in the network
    assert broadcast_image_to(hints, 4, 2).flatten().tolist() == [0, 1, 0, 1]
    assert broadcast_image_to(hints[:2], 6, 2).flatten().tolist() == [0, 1, 0, 0, 1, 0]


def test_controlnetapply_controls_reach_the_negative_side(net: ControlModel, hint: torch.Tensor) -> None:
    emb = torch.zeros(1, 77, 768)
    control = Control(net, hint, 1.0)
    pos = [CondEntry(emb, control=control, control_to_uncond=True)]
    neg = [CondEntry(emb), CondEntry(emb, area=(4, 4, 0, 0))]
    _, got = prepare_sides(pos, neg, 8, 8)
    assert got[0].control is control and got[1].control is None  # areas are left alone
    advanced = [CondEntry(emb, control=control, control_to_uncond=False)]
    assert prepare_sides(advanced, [CondEntry(emb)], 8, 8)[1][0].control is None


def _safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensors.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ({"lora_unet_down_blocks_0.lora_down.weight": (4, 8)}, "LoRA"),
        ({"conv_in.weight": (320, 64, 3, 3), "body.0.block1.weight": (320, 320, 3, 3)}, "T2I-Adapter"),
        ({"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)}, "diffusers"),
        ({"lora_controlnet": (1,)}, "control LoRA"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "checkpoint"),
    ],
)
def test_a_file_that_is_no_controlnet_is_named(tmp_path: Path, keys: dict[str, Any], says: str) -> None:
    path = _safetensors(tmp_path / "thing.safetensors", keys)
    with pytest.raises(ControlNetError, match=says) as info:
        load_controlnet(path)
    assert "thing.safetensors" in str(info.value)


def test_an_incomplete_controlnet_is_refused(tmp_path: Path) -> None:
    path = _safetensors(
        tmp_path / "cut.safetensors", {"control_model.zero_convs.0.0.weight": (320, 320, 1, 1)}
    )
    with pytest.raises(ControlNetError, match="cut.safetensors"):
        load_controlnet(path)


def test_a_diffusers_layout_file_gives_the_same_residuals(
    net: ControlModel, hint: torch.Tensor, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    state = {k: v.to(torch.float16).contiguous() for k, v in net.net.state_dict().items()}  # fp16-exact
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(state, str(path))
    del state
    again = load_controlnet(path)
    assert (again.family, again.context_dim) == ("sd15", 768)
    _, x_in, sigma, context = _first_call()
    want, got = (_run(Control(m, hint, 0.8), x_in, sigma, context) for m in (net, again))
    for a, b in zip([*got[0], got[1]], [*want[0], want[1]], strict=True):
        assert torch.equal(a, b)


def test_an_sdxl_shaped_diffusers_controlnet_is_read_as_sdxl(tmp_path: Path) -> None:
    """A small random SDXL-shaped ControlNet (64-channel heads, linear projections, text_time added
    conditioning, context 2048) saved in diffusers' layout: config read back, same residuals."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config: dict[str, Any] = {
        "block_out_channels": (64, 128),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "transformer_layers_per_block": (2, 2),
        "cross_attention_dim": 2048,
        "attention_head_dim": (1, 2),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 1280 + 6 * 256,
        "norm_num_groups": 32,
    }
    original = ControlNetModel(**config).eval()
    path = tmp_path / "sdxl_cn.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    loaded = load_controlnet(path)
    assert (loaded.family, loaded.context_dim) == ("sdxl", 2048)
    for key in (
        "block_out_channels",
        "down_block_types",
        "transformer_layers_per_block",
        "attention_head_dim",
    ):
        assert tuple(loaded.net.config[key]) == config[key], key
    added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]))
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, 2048), "controlnet_cond": torch.rand(2, 3, 64, 64)}
    with torch.inference_mode():
        want = original(*inputs, added_cond_kwargs=added, return_dict=False, **kwargs)
        got = loaded.net(*inputs, added_cond_kwargs=added, return_dict=False, **kwargs)
    for a, b in zip([*got[0], got[1]], [*want[0], want[1]], strict=True):
        assert torch.equal(a, b)
