"""T2I-Adapters: each layout loads (tests/t2i_adapter_files.py), the features equal ComfyUI's formulas
(comfy/t2i_adapter/adapter.py, restated here with torch.nn.functional on the file's tensors), the hint
is prepared as ComfyUI's T2IAdapter.get_control prepares it, the features land after the input blocks
ComfyUI adds them to (real SD1.5 and SDXL shapes, on the meta device), and chains merge as
control_merge does."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nodes.sd.cond_entries import percent_to_sigma
from nodes.sd.control import Control, adapter_features, residuals
from nodes.sd.controlnet import ControlModel, ControlNetError, load_controlnet
from nodes.sd.model_sampling import EPS
from nodes.sd.t2i_adapter import Adapter, AdapterSpec, input_block_modules
from tests.conftest import assert_within_floor
from tests.t2i_adapter_files import diffusers_name

SKETCH, CONV, LIGHT = (
    "t2iadapter_sketch_mini.safetensors",
    "t2iadapter_canny_mini_conv.safetensors",
    "t2iadapter_light_mini.safetensors",
)
DIFFUSERS, XL = "t2i-adapter-mini-diffusers.safetensors", "t2i-adapter-canny-sdxl-mini.safetensors"
SCHEDULE = EPS.schedule


def _load(folder: Path, name: str) -> ControlModel:
    return load_controlnet(folder / name)


# ---- ComfyUI's formulas, restated (comfy/t2i_adapter/adapter.py) -------------------------------------


def _conv(sd: dict[str, torch.Tensor], name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    weight = sd[f"{name}.weight"]
    return F.conv2d(x, weight, sd[f"{name}.bias"], stride, weight.shape[-1] // 2)


def _avg_down(x: torch.Tensor) -> torch.Tensor:
    """Downsample(use_conv=False): AvgPool2d(2, 2) whose padding is set to (H % 2, W % 2) per call."""
    return torch.nn.AvgPool2d(2, 2, padding=[x.shape[2] % 2, x.shape[3] % 2])(x)


def comfy_full(sd: dict[str, torch.Tensor], hint: torch.Tensor, xl: bool) -> dict[str, list[Any]]:
    """Adapter(nums_rb=2, sk=True).forward, then `features[::-1]` and the SDXL input/middle split."""
    x = _conv(sd, "conv_in", F.pixel_unshuffle(hint, 16 if xl else 8))
    downsampled = [2] if xl else [3, 2, 1]
    features: list[Any] = []
    for i in range(4):
        for j in range(2):
            block = f"body.{i * 2 + j}"
            if j == 0 and i in downsampled:
                conv = f"{block}.down_opt.op"
                x = _conv(sd, conv, x, 2) if f"{conv}.weight" in sd else _avg_down(x)
            if f"{block}.in_conv.weight" in sd:
                x = _conv(sd, f"{block}.in_conv", x)
            x = _conv(sd, f"{block}.block2", torch.relu(_conv(sd, f"{block}.block1", x))) + x
        if xl:
            features.append(None)
            if i == 0:
                features += [None, None]
            if i == 2:
                features.append(None)
        else:
            features += [None, None]
        features.append(x)
    features = features[::-1]
    return {"input": features[1:], "middle": features[:1]} if xl else {"input": features}


def comfy_light(sd: dict[str, torch.Tensor], hint: torch.Tensor) -> dict[str, list[Any]]:
    """Adapter_light.forward: per level an extractor (downsample after level 0, 1x1 in, blocks, 1x1 out)."""
    x = F.pixel_unshuffle(hint, 8)
    features: list[Any] = []
    for i in range(4):
        if i > 0:
            x = _avg_down(x)
        x = _conv(sd, f"body.{i}.in_conv", x)
        k = 0
        while f"body.{i}.body.{k}.block1.weight" in sd:
            block = f"body.{i}.body.{k}"
            x = _conv(sd, f"{block}.block2", torch.relu(_conv(sd, f"{block}.block1", x))) + x
            k += 1
        x = _conv(sd, f"body.{i}.out_conv", x)
        features += [None, None, x]
    return {"input": features[::-1]}


def comfy_hint(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.common_upscale(image, width, height, "nearest-exact", "center")."""
    old_h, old_w = image.shape[2], image.shape[3]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    cropped = image.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    return F.interpolate(cropped, size=(height, width), mode="nearest-exact")


def _same(got: dict[str, list[Any]], want: dict[str, list[Any]]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert [g is None for g in got[key]] == [w is None for w in want[key]], key
        for g, w in zip(got[key], want[key], strict=True):
            if w is not None:
                assert g.shape == w.shape
                assert_within_floor(g, w)


# ---- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "light", "xl", "ksize", "use_conv", "grey"),
    [
        (SKETCH, False, False, 1, False, True),
        (CONV, False, False, 3, True, False),
        (LIGHT, True, False, 3, False, False),
        (DIFFUSERS, False, False, 1, False, True),
        (XL, False, True, 1, False, False),
    ],
)
def test_each_layout_loads_as_comfyui_reads_it(
    mini_t2i_adapters: Path, name: str, light: bool, xl: bool, ksize: int, use_conv: bool, grey: bool
) -> None:
    model = _load(mini_t2i_adapters, name)
    spec = model.adapter
    assert spec is not None and model.kind == "T2I-Adapter" and model.lora is None
    assert (spec.light, spec.xl, spec.hint_channels == 1) == (light, xl, grey)
    if not light:
        assert (spec.ksize, spec.use_conv, spec.blocks) == (ksize, use_conv, 2)
    assert (model.family, model.context_dim) == (("sdxl", 2048) if xl else ("sd15", 768))
    file_keys = load_file(str(mini_t2i_adapters / name)).keys()
    assert len(model.net.state_dict()) == len(file_keys)  # every tensor of the file, no other


def test_the_diffusers_layout_is_the_same_network(mini_t2i_adapters: Path) -> None:
    original = _load(mini_t2i_adapters, SKETCH).net.state_dict()
    renamed = _load(mini_t2i_adapters, DIFFUSERS).net.state_dict()
    assert renamed.keys() == original.keys()
    assert all(torch.equal(renamed[k], original[k]) for k in original)
    assert diffusers_name("body.3.block1.weight") == "adapter.body.1.resnets.1.block1.weight"


def test_a_pickle_holding_an_adapter_dict_loads(mini_t2i_adapters: Path, tmp_path: Path) -> None:
    tensors = load_file(str(mini_t2i_adapters / SKETCH))
    path = tmp_path / "t2iadapter_sketch.pth"
    torch.save({"adapter": tensors}, path)
    got = load_controlnet(path).net.state_dict()
    assert all(torch.equal(got[k], tensors[k].float()) for k in tensors)


def test_an_incomplete_adapter_and_a_cascade_controlnet_are_refused_naming_the_file(
    mini_t2i_adapters: Path, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    tensors = load_file(str(mini_t2i_adapters / SKETCH))
    cut = tmp_path / "cut_adapter.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("body.7.")}, str(cut))
    with pytest.raises(ControlNetError, match=r"cut_adapter\.safetensors.*T2I-Adapter"):
        load_controlnet(cut)
    cascade = tmp_path / "cascade_canny.safetensors"
    save_file({"backbone.0.0.weight": torch.zeros(4, 4, 1, 1)}, str(cascade))
    with pytest.raises(ControlNetError, match=r"'cascade_canny\.safetensors' is a Stable Cascade ControlNet"):
        load_controlnet(cascade)


# ---- the network -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [SKETCH, CONV, LIGHT, XL])
def test_features_follow_comfyuis_formulas(mini_t2i_adapters: Path, name: str) -> None:
    """Odd unshuffled sizes (9 x 7) take the padded average pool, as ComfyUI's Downsample does."""
    model = _load(mini_t2i_adapters, name)
    assert model.adapter is not None
    sd = {k: v.float() for k, v in load_file(str(mini_t2i_adapters / name)).items()}
    size = (144, 112) if model.adapter.xl else (72, 56)
    hint = torch.rand(2, model.adapter.hint_channels, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = model.net(hint)
    want = comfy_light(sd, hint) if model.adapter.light else comfy_full(sd, hint, model.adapter.xl)
    _same(got, want)
    assert len(got["input"]) == (10 if model.adapter.xl else 12)


def test_the_hint_is_resized_rounded_up_and_made_grey_as_comfyui_does(mini_t2i_adapters: Path) -> None:
    """A 50 x 70 hint for a 9 x 7 latent: SDXL adapters see it at 80 x 64 (8x the latent rounded up to
    16), SD1 ones at 72 x 56; a grey adapter sees the channel mean."""
    image = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(2))
    x = torch.zeros(2, 4, 9, 7)
    for name, width, height in ((XL, 64, 80), (SKETCH, 56, 72)):
        model = _load(mini_t2i_adapters, name)
        assert model.adapter is not None
        sd = {k: v.float() for k, v in load_file(str(mini_t2i_adapters / name)).items()}
        hint = comfy_hint(image, width, height)
        if model.adapter.hint_channels == 1:
            hint = torch.mean(hint, 1, keepdim=True)
        with torch.inference_mode():
            got = adapter_features(Control(model, image), x, 2)
        _same(got, comfy_full(sd, hint, model.adapter.xl))


def _meta_unet(**config: Any) -> Any:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _block_shapes(unet: Any, height: int, width: int) -> list[tuple[int, int, int]]:
    """(channels, height, width) of each ComfyUI input block's output, from the modules' widths."""
    from diffusers.models.downsampling import Downsample2D

    out = []
    for module in input_block_modules(unet):
        if isinstance(module, Downsample2D):
            height, width = math.ceil(height / 2), math.ceil(width / 2)
        channels = getattr(module, "out_channels", None) or module.in_channels
        out.append((int(channels), height, width))
    return out


SD15_CONFIG: dict[str, Any] = {}  # diffusers' defaults are SD1.x's UNet
SDXL_CONFIG: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


@pytest.mark.parametrize(
    ("xl", "config", "blocks", "middle"),
    [
        (False, SD15_CONFIG, {2: (320, 64, 64), 5: (640, 32, 32), 8: (1280, 16, 16), 11: (1280, 8, 8)}, None),
        (True, SDXL_CONFIG, {3: (320, 64, 64), 5: (640, 64, 64), 8: (1280, 32, 32)}, (1280, 32, 32)),
    ],
)
def test_real_size_features_land_where_comfyui_adds_them(
    xl: bool, config: dict[str, Any], blocks: dict[int, tuple[int, ...]], middle: Any
) -> None:
    """TencentARC's shapes (c = 320; SD1: 1x1 kernels, SDXL: 768 inputs) on a 512 x 512 SD1.5 and a
    1024 x 1024 SDXL latent: input block k takes `input[-1-k]` (openaimodel pops one per block)."""
    spec = AdapterSpec(False, 768 if xl else 192, (320, 640, 1280, 1280), 2, ksize=1, xl=xl)
    size = 128 if xl else 64
    with torch.device("meta"):
        features = Adapter(spec)(torch.zeros(1, 3, size * 8, size * 8))
    popped = {k: f for k, f in enumerate(reversed(features["input"])) if f is not None}
    assert {k: tuple(f.shape[1:]) for k, f in popped.items()} == blocks
    unet = _meta_unet(**config)
    shapes = _block_shapes(unet, size, size)
    assert len(shapes) == (9 if xl else 12)
    assert all(shapes[k] == want for k, want in blocks.items())
    if middle is not None:
        assert tuple(features["middle"][0].shape[1:]) == middle == (1280, *shapes[-1][1:])
    else:
        assert "middle" not in features


# ---- chains ----------------------------------------------------------------------------------------


def _control(control: Control, x: torch.Tensor, sigma: float = 14.6) -> Any:
    with torch.inference_mode():
        return residuals(
            control,
            x,
            SCHEDULE.timestep(torch.tensor([sigma])).float(),
            sigma,
            torch.zeros(x.shape[0], 77, 768),
            None,
            2,
            lambda p: percent_to_sigma(SCHEDULE, p),
        )


def test_a_chain_merges_adapters_and_controlnets_as_control_merge_does(
    mini_t2i_adapters: Path, mini_controlnet: Path
) -> None:
    sketch, light = _load(mini_t2i_adapters, SKETCH), _load(mini_t2i_adapters, LIGHT)
    net = load_controlnet(mini_controlnet)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    a, b = (_control(Control(m, image, 1.0), x)["input"] for m in (sketch, light))
    late = Control(light, image, 0.9, start_percent=0.5)  # starts at sigma 1.9: off at 14.6
    chained = Control(sketch, image, 0.5, previous=Control(light, image, 0.25, previous=late))
    got = _control(chained, x)
    assert got["output"] == [] and got["middle"] == []
    for g, one, two in zip(got["input"], a, b, strict=True):
        assert (g is None) == (one is None) == (two is None)
        if g is not None:
            assert_within_floor(g, 0.25 * two + 0.5 * one)
    assert _control(late, x) is None
    cn = _control(Control(net, image, 0.8), x)
    both = _control(Control(sketch, image, 0.5, previous=Control(net, image, 0.8)), x)
    assert all(torch.equal(g, w) for g, w in zip(both["output"], cn["output"], strict=True))
    assert torch.equal(both["middle"][0], cn["middle"][0])
    assert all(g is None or torch.equal(g, 0.5 * w) for g, w in zip(both["input"], a, strict=True))
