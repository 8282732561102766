"""Reduced-depth SDXL ControlNets in diffusers' layout (`controlnet-canny-sdxl-1.0-small` / `-mid`, the
`diffusers_xl_*_small` / `_mid` files of sd_control_collection), written on the mini SDXL's shapes by
tests/sd/sdxl_controlnet_files.py. The file is exactly what diffusers' ControlNetModel of that depth
saves; nodegraph reads it as ComfyUI does (comfy/model_detection.py `SDXL_small_cnet` /
`SDXL_mid_cnet`): a down level of depth 0 runs without its transformer, the middle block keeps its
own (depth 0 or 1); the residuals are those of that network. Slow (the mini SDXL ControlNet's
shapes: two files written and loaded, about 40 s on the 2-core machine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from nodes.sd.controlnet import ControlModel, load_controlnet
from tests.sd.sdxl_controlnet_files import VARIANTS, write_diffusers

pytestmark = pytest.mark.slow
CROSS = "CrossAttnDownBlock2D"
# the mini's attention levels whose depth the variant takes to 0: their norm / proj_* are left over
LEFT_OVER_LEVELS = {"small": (1, 2), "mid": (1,)}


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory, oracle_dir: Path
) -> dict[str, tuple[ControlModel, dict[str, torch.Tensor]]]:
    """{variant: (the ControlNet as loaded, the file's tensors)}."""
    base = tmp_path_factory.mktemp("xl_cn_variants")
    out = {}
    for variant in VARIANTS:
        path = write_diffusers(oracle_dir, base / f"xl_canny_{variant}.safetensors", variant)
        out[variant] = (load_controlnet(path), load_file(str(path)))
    return out


def _published(variant: str, ours: ControlModel) -> Any:
    """diffusers' own ControlNetModel as the variant's config.json has it: every level but the first a
    CrossAttnDownBlock2D, transformer_layers_per_block the variant's (the middle block takes the last)."""
    from diffusers import ControlNetModel

    config = {k: v for k, v in ours.net.config.items() if not k.startswith("_")}
    config["down_block_types"] = ("DownBlock2D", CROSS, CROSS)
    config["transformer_layers_per_block"] = VARIANTS[variant][0]
    return ControlNetModel(**config)


def _left_over(variant: str) -> set[str]:
    return {
        f"down_blocks.{level}.attentions.{slot}.{part}.{p}"
        for level in LEFT_OVER_LEVELS[variant]
        for slot in (0, 1)
        for part in ("norm", "proj_in", "proj_out")
        for p in ("weight", "bias")
    }


@pytest.mark.parametrize("variant", ["small", "mid"])
def test_a_reduced_depth_sdxl_controlnet_loads_with_comfyuis_depths(loaded: Any, variant: str) -> None:
    net, tensors = loaded[variant]
    assert (net.family, net.context_dim) == ("sdxl", 2048)
    config = net.net.config
    depths, mid = VARIANTS[variant]
    assert tuple(config.down_block_types) == tuple(CROSS if d else "DownBlock2D" for d in depths)
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert config.transformer_layers_per_block[-1] == mid  # diffusers' middle block takes the last
    assert config.cross_attention_dim == 2048 and config.use_linear_projection
    assert len(net.net.mid_block.attentions[0].transformer_blocks) == mid
    # the generator writes exactly diffusers' layout of that depth
    with torch.device("meta"):
        assert set(_published(variant, net).state_dict()) == set(tensors)
    # every parameter from the file; left over only the depth-0 down levels' norm / proj_*, as in ComfyUI
    state = net.net.state_dict()
    assert set(tensors) - set(state) == _left_over(variant) and set(state) <= set(tensors)
    assert all(torch.equal(state[k], tensors[k].float()) for k in state)


@pytest.mark.parametrize("variant", ["small", "mid"])
def test_a_reduced_depth_sdxl_controlnet_gives_comfyuis_residuals(loaded: Any, variant: str) -> None:
    """Residual shapes as the full mini ControlNet's; the values those of diffusers' own network with the
    left-over transformers made the identity (proj_out zeroed: x + 0), i.e. ComfyUI's resnets-only
    level; diffusers' network with them applied differs."""
    net, tensors = loaded[variant]
    with torch.device("meta"):
        published = _published(variant, net).eval()
    published.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    torch.manual_seed(0)
    added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]))
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, 2048), "controlnet_cond": torch.rand(2, 3, 64, 64)}
    with torch.inference_mode():
        got = net.net(*inputs, added_cond_kwargs=added, return_dict=False, **kwargs)
        applied = published(*inputs, added_cond_kwargs=added, return_dict=False, **kwargs)
        for key in _left_over(variant):
            if ".proj_out." in key:
                published.get_submodule(key.rsplit(".", 1)[0]).get_parameter(key.rsplit(".", 1)[1]).zero_()
        want = published(*inputs, added_cond_kwargs=added, return_dict=False, **kwargs)
    shapes = [(2, 320, 8, 8)] * 3 + [(2, 320, 4, 4)] * 3 + [(2, 320, 2, 2)] + [(2, 640, 2, 2)] * 3
    assert [tuple(r.shape) for r in got[0]] == shapes[:-1] and tuple(got[1].shape) == shapes[-1]
    ours, theirs, diffusers_own = ([*o[0], o[1]] for o in (got, want, applied))
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    assert not torch.allclose(ours[-1], diffusers_own[-1], rtol=0, atol=1e-3 * float(ours[-1].abs().max()))
