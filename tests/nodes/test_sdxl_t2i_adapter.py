"""SDXL T2I-Adapters through the nodes on the mini SDXL UNet (two-layer text encoders, as in
test_sdxl_controlnet.py): the adapter (c = 160, tests/t2i_adapter_files.py) steers the image through
input blocks 5 and 8 and the middle block, its first feature (160 wide where the mini UNet's input
block 3 is 320) left out with a warning naming the file, as ComfyUI leaves it out; strength 0 adds
exactly nothing; stacked with an SDXL ControlNet both act (the middle gets the sum, control_merge);
an SD1 adapter on SDXL is refused naming the file."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.conditioning import CLIPTextEncode
from nodes.controlnet import ControlNetApplyAdvanced, ControlNetLoader
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.sampling import KSampler
from nodes.sd.control import Control
from tests.sd.sdxl_controlnet_files import write_sgm
from tests.sd.sdxl_files import write_depth_variant

pytestmark = pytest.mark.slow
HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
XL, SKETCH = "t2i-adapter-canny-sdxl-mini.safetensors", "t2iadapter_sketch_mini.safetensors"
CONTROLNET = "xl_canny_sgm.safetensors"


@pytest.fixture(scope="module")
def xl_env(
    tmp_path_factory: pytest.TempPathFactory,
    oracle_dir: Path,
    mini_sdxl_checkpoint: Path,
    mini_t2i_adapters: Path,
) -> Iterator[Environment]:
    base = tmp_path_factory.mktemp("sdxl_t2i_adapter")
    ckpts, nets = base / "models" / "checkpoints", base / "models" / "t2i_adapter"
    write_depth_variant(mini_sdxl_checkpoint, ckpts / "mini_xl.safetensors", "mini")
    nets.mkdir(parents=True)
    for name in (XL, SKETCH):
        (nets / name).symlink_to(mini_t2i_adapters / name)
    write_sgm(oracle_dir, base / "models" / "controlnet" / CONTROLNET)
    yield Environment(Folders.at(base))
    shutil.rmtree(base, ignore_errors=True)  # gigabytes of variants: not kept to the session's end


@pytest.fixture(scope="module")
def handles(xl_env: Environment) -> tuple[Any, Any, Any]:
    ctx = RecordingContext(xl_env)
    model, clip, _ = CheckpointLoaderSimple().run(ctx, "mini_xl.safetensors")
    pos = CLIPTextEncode().run(ctx, "a photo of a cat sitting on a red chair", clip)[0]
    neg = CLIPTextEncode().run(ctx, "blurry", clip)[0]
    return model, pos, neg


def _net(env: Environment, name: str) -> Any:
    return ControlNetLoader().run(RecordingContext(env), name)[0]


def _render(env: Environment, handles: Any, nets: list[tuple[str, float]], raw: Control | None = None) -> Any:
    """The latent of a 1-step euler txt2img at 64 x 64 (cfg 7: cond and uncond in one batch), with one
    ControlNetApplyAdvanced per (file, strength), chained; or with `raw` set on both sides."""
    ctx = RecordingContext(env)
    model, pos, neg = handles
    for name, strength in nets:
        pos, neg = ControlNetApplyAdvanced().run(ctx, pos, neg, _net(env, name), HINT, strength, 0.0, 1.0)
    if raw is not None:
        pos, neg = ([[e, o | {"control": raw}] for e, o in side] for side in (pos, neg))
    latent = EmptyLatentImage().run(ctx, 64, 64, 1)[0]
    return KSampler().run(ctx, model, 42, 1, 7.0, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]


@pytest.fixture(scope="module")
def plain(xl_env: Environment, handles: Any) -> torch.Tensor:
    return _render(xl_env, handles, [])


def test_an_sdxl_adapter_steers_the_image_where_its_features_fit(
    xl_env: Environment, handles: Any, plain: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        steered = _render(xl_env, handles, [(XL, 1.0)])
    assert torch.isfinite(steered).all()
    assert float((steered - plain).abs().max()) > 1e-2
    (record,) = [r for r in caplog.records if "T2I-Adapter" in r.getMessage()]
    message = record.getMessage()
    assert XL in message and "input block 3: feature [160, 4, 4], UNet [320, 4, 4]" in message
    assert "input block 5" not in message and "middle" not in message  # those fit
    zero = Control(_net(xl_env, XL), HINT[..., :3].movedim(-1, 1), 0.0)
    assert torch.equal(_render(xl_env, handles, [], raw=zero), plain)


def test_an_adapter_stacked_on_a_controlnet_adds_both(
    xl_env: Environment, handles: Any, plain: torch.Tensor
) -> None:
    adapter = _render(xl_env, handles, [(XL, 1.0)])
    controlnet = _render(xl_env, handles, [(CONTROLNET, 0.9)])
    both = _render(xl_env, handles, [(CONTROLNET, 0.9), (XL, 1.0)])
    assert torch.isfinite(both).all()
    for alone in (adapter, controlnet, plain):
        assert float((both - alone).abs().max()) > 1e-3


def test_an_sd1_adapter_on_sdxl_is_refused_naming_the_file(xl_env: Environment, handles: Any) -> None:
    with pytest.raises(ValueError, match=rf"T2I-Adapter '{SKETCH}' is an SD1.x T2I-Adapter .*width 2048"):
        _render(xl_env, handles, [(SKETCH, 1.0)])
