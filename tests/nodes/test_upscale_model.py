"""UpscaleModelLoader / ImageUpscaleWithModel: small random RRDBNet files in each key layout, an
independent forward written out with F.conv2d, tiling, bad files, declarations, and a workflow."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from nodegraph.engine import Settings, build_engine
from nodegraph.env import Environment
from nodegraph.events import Event, ExecutionCached
from nodegraph.folders import Folders
from nodegraph.registry import Registry
from nodegraph.testing import RecordingContext
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.sd.esrgan import EsrganConfig, UpscaleModel, UpscaleModelError
from nodes.upscale_model import ImageUpscaleWithModel, UpscaleModelLoader

NF, GC = 8, 32


# ---- random weights, written independently of nodes/sd/esrgan.py


def basicsr_state(scale: int, nb: int = 1, seed: int = 0, unshuffle: int = 1) -> dict[str, torch.Tensor]:
    """A BasicSR-named RRDBNet state dict of random weights (x2/x1 Real-ESRGAN when unshuffle > 1)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, int]] = {"conv_first": (NF, 3 * unshuffle**2)}
    for n in range(nb):
        for k in (1, 2, 3):
            for j in range(1, 6):
                shapes[f"body.{n}.rdb{k}.conv{j}"] = (GC if j < 5 else NF, NF + (j - 1) * GC)
    shapes["conv_body"] = (NF, NF)
    for i in range(1, int(math.log2(scale * unshuffle)) + 1):
        shapes[f"conv_up{i}"] = (NF, NF)
    shapes |= {"conv_hr": (NF, NF), "conv_last": (3, NF)}
    state: dict[str, torch.Tensor] = {}
    for name, (out_c, in_c) in shapes.items():
        bound = 1 / math.sqrt(in_c * 9)  # the usual fan-in scale keeps activations O(1)
        state[f"{name}.weight"] = (torch.rand(out_c, in_c, 3, 3, generator=g) * 2 - 1) * bound
        state[f"{name}.bias"] = (torch.rand(out_c, generator=g) * 2 - 1) * bound + (
            0.5 if name == "conv_last" else 0
        )
    return state


def to_old_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original ESRGAN names: model.0, model.1.sub.N.RDBk.convj.0, model.1.sub.<nb>, 3, 6, ..."""
    nb = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    ups = sorted({k.split(".")[0] for k in state if k.startswith("conv_up")})
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}"}
    names |= {up: f"model.{3 * (i + 1)}" for i, up in enumerate(ups)}
    names |= {"conv_hr": f"model.{3 * len(ups) + 2}", "conv_last": f"model.{3 * len(ups) + 4}"}
    out = {}
    for key, value in state.items():
        head, kind = key.rsplit(".", 1)
        if head.startswith("body."):
            _, n, rdb, conv = head.split(".")
            out[f"model.1.sub.{n}.RDB{rdb[3:]}.{conv}.0.{kind}"] = value
        else:
            out[f"{names[head]}.{kind}"] = value
    return out


def to_xinntao_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.replace("conv_body", "trunk_conv").replace("conv_up", "upconv").replace("conv_hr", "HRconv")
        if key.startswith("body."):
            _, n, rdb, rest = key.split(".", 3)
            key = f"RRDB_trunk.{n}.RDB{rdb[3:]}.{rest}"
        out[key] = value
    return out


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, unshuffle: int = 1) -> torch.Tensor:
    """ESRGAN's forward written out: dense blocks, RRDBs, trunk skip, nearest x2 + conv, hr, last."""

    def conv(name: str, t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)

    def lrelu(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t >= 0, t, 0.2 * t)

    h, w = x.shape[2:]
    if unshuffle > 1:
        x = F.pad(x, (0, -w % unshuffle, 0, -h % unshuffle), mode="reflect")
        x = F.pixel_unshuffle(x, unshuffle)
    fea = conv("conv_first", x)
    trunk = fea
    nb = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    for n in range(nb):
        block_in = trunk
        for k in (1, 2, 3):
            feats = [trunk]
            for j in range(1, 5):
                feats.append(lrelu(conv(f"body.{n}.rdb{k}.conv{j}", torch.cat(feats, 1))))
            trunk = conv(f"body.{n}.rdb{k}.conv5", torch.cat(feats, 1)) * 0.2 + trunk
        trunk = trunk * 0.2 + block_in
    fea = fea + conv("conv_body", trunk)
    i = 1
    while f"conv_up{i}.weight" in state:
        fea = lrelu(conv(f"conv_up{i}", F.interpolate(fea, scale_factor=2, mode="nearest")))
        i += 1
    out = conv("conv_last", lrelu(conv("conv_hr", fea)))
    scale = 2 ** (i - 1) // unshuffle
    return out[:, :, : h * scale, : w * scale]


def write(folder: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    else:
        torch.save(state, folder / name)
    return name


@pytest.fixture
def upscale_dir(tmp_path: Path) -> Path:
    return tmp_path / "models" / "upscale_models"


@pytest.fixture
def ctx(tmp_path: Path) -> RecordingContext:
    return RecordingContext(Environment(Folders.at(tmp_path)))


def load(ctx: RecordingContext, name: str) -> UpscaleModel:
    (model,) = UpscaleModelLoader().run(ctx, name)
    return model


LAYOUTS = {"basicsr": lambda s: s, "esrgan": to_old_layout, "xinntao": to_xinntao_layout}


# ---- (a) detection and strict loading


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_loader_detects_layout_scale_and_size(
    ctx: RecordingContext, upscale_dir: Path, layout: str, scale: int, ext: str
) -> None:
    state = basicsr_state(scale, nb=2 if scale == 2 else 1)
    name = write(upscale_dir, f"m{ext}", LAYOUTS[layout](state))
    model = load(ctx, name)
    nb = 2 if scale == 2 else 1
    assert model.config == EsrganConfig(3, 3, NF, nb, GC, int(math.log2(scale)), 1)
    assert model.scale == scale and model.source == name
    loaded = model.net.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_basicsr_params_ema_wrapper_and_real_esrgan_x2(ctx: RecordingContext, upscale_dir: Path) -> None:
    """RealESRGAN_x2plus.pth: {"params_ema": ...}, first conv on 12 channels (pixel-unshuffle by 2)."""
    state = basicsr_state(2, unshuffle=2, seed=3)
    upscale_dir.mkdir(parents=True)
    wrapped = {"params_ema": state, "params": basicsr_state(2, unshuffle=2, seed=4)}
    torch.save(wrapped, upscale_dir / "RealESRGAN_x2plus.pth")
    model = load(ctx, "RealESRGAN_x2plus.pth")
    assert (model.config.unshuffle, model.config.in_channels, model.scale) == (2, 3, 2)
    x = torch.rand(1, 3, 13, 10, generator=torch.Generator().manual_seed(5))  # odd side: padded, then cropped
    with torch.inference_mode():
        ours = model.net(x)
    assert ours.shape == (1, 3, 26, 20)
    assert float((ours - reference_forward(state, x, unshuffle=2)).abs().max()) < 1e-5


# ---- (b) numbers


@pytest.mark.parametrize(("layout", "scale"), [("esrgan", 4), ("basicsr", 2), ("basicsr", 4)])
def test_forward_equals_the_written_out_reference(
    ctx: RecordingContext, upscale_dir: Path, layout: str, scale: int
) -> None:
    state = basicsr_state(scale, nb=2, seed=7)
    model = load(ctx, write(upscale_dir, "m.safetensors", LAYOUTS[layout](state)))
    image = torch.rand(1, 17, 23, 3, generator=torch.Generator().manual_seed(8))
    (out,) = ImageUpscaleWithModel().run(ctx, model, image)  # one tile: the node is the plain forward
    expected = reference_forward(state, image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    assert out.shape == (1, 17 * scale, 23 * scale, 3)
    assert float((out - expected).abs().max()) < 1e-5


def test_output_shape_range_and_alpha(ctx: RecordingContext, upscale_dir: Path) -> None:
    model = load(ctx, write(upscale_dir, "m.pth", to_old_layout(basicsr_state(4, seed=1))))
    image = torch.rand(2, 12, 9, 3, generator=torch.Generator().manual_seed(2))
    (out,) = ImageUpscaleWithModel().run(ctx, model, image)
    assert out.shape == (2, 48, 36, 3) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert 0.0 < float(out.mean()) < 1.0 and out.std() > 0  # not everything clamped away
    rgba = torch.cat([image, torch.ones(2, 12, 9, 1)], -1)
    (out4,) = ImageUpscaleWithModel().run(ctx, model, rgba)
    assert out4.shape == (2, 48, 36, 4)
    assert torch.equal(out4[..., :3], out) and torch.allclose(out4[..., 3], torch.ones(2, 48, 36))


def test_tiled_upscale_is_close_to_the_whole_image(ctx: RecordingContext, upscale_dir: Path) -> None:
    """A 600 px wide image takes two 512 px tiles (x 0..511 and 480..599, overlap 32).

    RRDBNet has no normalisation, so a tile's output equals the whole image's except within its
    receptive field of a cut edge: 17 3x3 convs at input resolution with nb=1 (conv_first, 15 in
    the RRDB, conv_body) plus a few at output resolution, about 19 input px. Outside the overlap
    band (input x 480..511, output x 960..1023) every pixel is exact. Inside it, each tile is
    wrong only near its own cut edge, where the feather gives it a small weight. Measured (torch
    2.13, CPU, four seeds): worst pixel 0.0014-0.0022 on outputs of std 0.03-0.07; blending the
    tiles with flat weights instead of the feather gives 0.071. The bound 0.01 sits between.
    """
    state = basicsr_state(2, seed=11)
    model = load(ctx, write(upscale_dir, "m.safetensors", state))
    image = torch.rand(1, 24, 600, 3, generator=torch.Generator().manual_seed(12))
    (tiled,) = ImageUpscaleWithModel().run(ctx, model, image)
    with torch.inference_mode():
        whole = model.net(image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    assert tiled.shape == whole.shape == (1, 48, 1200, 3)
    diff = (tiled - whole).abs()
    outside = torch.cat([diff[:, :, :960], diff[:, :, 1024:]], 2)
    assert float(outside.max()) < 1e-5
    assert 0 < float(diff[:, :, 960:1024].max()) < 0.01


# ---- (c) bad inputs: each a clear error naming the file


def test_a_lora_or_a_checkpoint_is_refused(
    ctx: RecordingContext, upscale_dir: Path, mini_loras: Path, mini_checkpoint: Path
) -> None:
    upscale_dir.mkdir(parents=True)
    shutil.copy(mini_loras / "mini_lora_a.safetensors", upscale_dir / "lora.safetensors")
    (upscale_dir / "sd15.safetensors").symlink_to(mini_checkpoint)
    with pytest.raises(UpscaleModelError, match=r"'lora.safetensors' is not an ESRGAN/RRDBNet model.*LoRA"):
        load(ctx, "lora.safetensors")
    with pytest.raises(UpscaleModelError, match=r"'sd15.safetensors' is not an ESRGAN/RRDBNet.*checkpoint"):
        load(ctx, "sd15.safetensors")


@pytest.mark.parametrize("name", ["broken.safetensors", "broken.pth"])
def test_a_corrupt_file_is_refused(ctx: RecordingContext, upscale_dir: Path, name: str) -> None:
    upscale_dir.mkdir(parents=True)
    (upscale_dir / name).write_bytes(b"\x00\x01 not a model " * 40)
    with pytest.raises(UpscaleModelError, match=f"'{name}' cannot be read"):
        load(ctx, name)


def test_a_truncated_model_is_refused(ctx: RecordingContext, upscale_dir: Path) -> None:
    name = write(upscale_dir, "cut.safetensors", basicsr_state(4))
    data = (upscale_dir / name).read_bytes()
    (upscale_dir / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UpscaleModelError, match="'cut.safetensors' cannot be read"):
        load(ctx, name)


def test_missing_layer_fails_the_strict_load(ctx: RecordingContext, upscale_dir: Path) -> None:
    state = basicsr_state(4)
    del state["conv_hr.bias"]
    with pytest.raises(UpscaleModelError, match=r"'partial.safetensors'.*missing \['conv_hr.bias'\]"):
        load(ctx, write(upscale_dir, "partial.safetensors", state))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (str(self.marker),))


def test_a_pickle_with_code_is_refused_not_run(
    ctx: RecordingContext, upscale_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    state: dict[str, Any] = dict(basicsr_state(4))
    state["evil"] = _Payload(marker)
    upscale_dir.mkdir(parents=True)
    torch.save(state, upscale_dir / "evil.pth")
    with pytest.raises(UpscaleModelError, match="'evil.pth' is a pickle that needs code to run"):
        load(ctx, "evil.pth")
    assert not marker.exists()


def test_a_missing_name_is_a_validation_error(tmp_path: Path, upscale_dir: Path) -> None:
    write(upscale_dir, "real.safetensors", basicsr_state(2))
    env = Environment(Folders.at(tmp_path))
    prompt = {
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "nope.pth"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "u"}},
    }
    result = validate_prompt(prompt, Registry(all_nodes()), env)
    errors = result.node_errors["1"]["errors"]
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [
        ("value_not_in_list", "model_name")
    ]
    assert "nope.pth" in errors[0]["details"] and "real.safetensors" in errors[0]["details"]


# ---- (d) declarations


def test_the_loader_lists_the_upscale_models(tmp_path: Path, upscale_dir: Path) -> None:
    write(upscale_dir, "4x-Mini.safetensors", basicsr_state(4))  # the declarations: test_object_info.py
    infos = Registry(all_nodes()).object_info(Environment(Folders.at(tmp_path)))
    assert infos["UpscaleModelLoader"]["input"] == {"required": {"model_name": [["4x-Mini.safetensors"], {}]}}


# ---- (e) a workflow through the executor


def test_decode_upscale_save_workflow(tmp_path: Path, mini_checkpoint: Path) -> None:
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    write(tmp_path / "models" / "upscale_models", "4x-Mini.pth", to_old_layout(basicsr_state(4)))
    engine = build_engine(Settings(base_directory=tmp_path, preview_method="none"), all_nodes())
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["ckpt", 2]}},
        "up_model": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-Mini.pth"}},
        "upscale": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["up_model", 0], "image": ["decode", 0]},
        },
        "save": {"class_type": "SaveImage", "inputs": {"images": ["upscale", 0], "filename_prefix": "up"}},
    }

    def run(events: list[Event]) -> dict[str, Any]:
        checked = validate_prompt(prompt, engine.registry, engine.env)
        assert checked.ok, (checked.error, checked.node_errors)
        outcome = engine.executor.execute(checked.prompt, "p", events.append, outputs=checked.outputs)
        assert outcome.status == "success", outcome.error
        return dict(outcome.outputs)

    (entry,) = run([])["save"]["images"]
    with Image.open(Path(engine.env.folders.output_dir) / entry["subfolder"] / entry["filename"]) as png:
        assert png.size == (256, 192)
    # Run again with another prefix: the loader (and everything upstream) comes from the cache.
    prompt["save"]["inputs"]["filename_prefix"] = "up2"
    events: list[Event] = []
    run(events)
    cached = next(e for e in events if isinstance(e, ExecutionCached)).nodes
    assert {"up_model", "upscale"} <= set(cached)


def test_out_of_memory_even_in_small_tiles_is_a_clear_error(ctx: RecordingContext, upscale_dir: Path) -> None:
    model = load(ctx, write(upscale_dir, "oom.safetensors", basicsr_state(2, seed=3)))
    sizes: list[int] = []

    def no_memory(module: Any, args: Any) -> None:
        sizes.append(args[0].shape[-1])
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = model.net.register_forward_pre_hook(no_memory)
    try:
        with pytest.raises(UpscaleModelError, match=r"not enough device memory .*oom\.safetensors"):
            ImageUpscaleWithModel().run(ctx, model, torch.rand(1, 600, 600, 3))
    finally:
        hook.remove()
    assert sizes == [512, 256, 128]  # the tile halves down to the smallest before giving up
    assert next(model.net.parameters()).device.type == "cpu"  # the model is back on the CPU
