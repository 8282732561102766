"""SD1.x T2I-Adapters through the nodes: a workflow (LoadImage + ControlNetLoader of an adapter file in
models/t2i_adapter + ControlNetApplyAdvanced + KSampler) on a UNet with SD1.5's block structure
(UNETLoader; CLIP and VAE from the mini checkpoint), every SD1 layout steering the image, strength 0
equal to no adapter; on the oracle's mini SD1.5 (2 levels, 4 input blocks) no feature fits, so the
image is the plain one, as in ComfyUI, with a warning naming the file; an SDXL adapter on an SD1.x
model is refused naming the file."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.engine import Settings, build_engine
from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.component_loaders import UNETLoader
from nodes.conditioning import CLIPTextEncode
from nodes.controlnet import ControlNetLoader
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.sampling import KSampler
from nodes.sd.control import Control
from nodes.sd.latent_ops import load_latent_file
from tests.conftest import ORACLE

UNET = "sd15_shaped.safetensors"
SKETCH, CONV, LIGHT = (
    "t2iadapter_sketch_mini.safetensors",
    "t2iadapter_canny_mini_conv.safetensors",
    "t2iadapter_light_mini.safetensors",
)
DIFFUSERS, XL = "t2i-adapter-mini-diffusers.safetensors", "t2i-adapter-canny-sdxl-mini.safetensors"


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory,
    mini_checkpoint: Path,
    sd15_shaped_unet: Path,
    mini_t2i_adapters: Path,
) -> Any:
    base = tmp_path_factory.mktemp("t2i_adapter")
    links = {
        "checkpoints/mini.safetensors": mini_checkpoint,
        f"diffusion_models/{UNET}": sd15_shaped_unet,
        **{f"t2i_adapter/{p.name}": p for p in mini_t2i_adapters.glob("*.safetensors")},
    }
    for name, target in links.items():
        (base / "models" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "models" / name).symlink_to(target)
    (base / "input").mkdir()
    shutil.copy(ORACLE / "workflows-nodes" / "hint_64.png", base / "input" / "hint.png")
    return build_engine(Settings(base_directory=base, preview_method="none"), all_nodes())


def prompt(model: list[Any], adapter: str | None, strength: float = 1.0) -> dict[str, Any]:
    """txt2img at 64 x 64, 2 euler steps at cfg 7, with ControlNetApplyAdvanced when `adapter` is given."""
    sides: tuple[list[Any], list[Any]] = (["pos", 0], ["neg", 0])
    graph: dict[str, Any] = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house by a lake", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    if adapter is not None:
        graph |= {
            "hint": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
            "t2i": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": adapter}},
            "apply": {
                "class_type": "ControlNetApplyAdvanced",
                "inputs": {
                    "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["t2i", 0],
                    "image": ["hint", 0], "strength": strength, "start_percent": 0.0, "end_percent": 1.0,
                },
            },
        }  # fmt: skip
        sides = (["apply", 0], ["apply", 1])
    graph["sample"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model, "positive": sides[0], "negative": sides[1], "latent_image": ["latent", 0],
            "seed": 42, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0,
        },
    }  # fmt: skip
    graph["save"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["sample", 0], "filename_prefix": "t2i"},
    }
    return graph


def sampled(engine: Any, graph: dict[str, Any]) -> torch.Tensor:
    checked = validate_prompt(graph, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    outcome = engine.executor.execute(checked.prompt, "t2i", lambda event: None, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    (entry,) = outcome.outputs["save"]["latents"]
    return load_latent_file(Path(engine.env.folders.output_dir) / entry["subfolder"] / entry["filename"])


@pytest.fixture(scope="module")
def plain(engine: Any) -> torch.Tensor:
    return sampled(engine, prompt(["unet", 0], None))


def test_an_adapter_workflow_steers_the_image_and_strength_0_is_no_adapter(
    engine: Any, plain: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    assert SKETCH in engine.env.folders.list("controlnet")  # models/t2i_adapter is a ControlNet folder
    with caplog.at_level(logging.WARNING):
        steered = sampled(engine, prompt(["unet", 0], SKETCH))
    assert not [r for r in caplog.records if "T2I-Adapter" in r.getMessage()]  # every feature fits
    assert torch.isfinite(steered).all()
    assert float((steered - plain).abs().max()) > 1e-2
    assert torch.equal(sampled(engine, prompt(["unet", 0], SKETCH, strength=0.0)), plain)
    weaker = sampled(engine, prompt(["unet", 0], SKETCH, strength=0.5))
    assert 0 < float((weaker - plain).abs().max()) < float((steered - plain).abs().max())


@pytest.mark.parametrize("name", [CONV, LIGHT, DIFFUSERS])
def test_every_sd1_layout_steers_the_image(engine: Any, plain: torch.Tensor, name: str) -> None:
    got = sampled(engine, prompt(["unet", 0], name))
    assert torch.isfinite(got).all() and float((got - plain).abs().max()) > 1e-2
    if name == DIFFUSERS:  # the sketch adapter renamed: the same image
        assert torch.equal(got, sampled(engine, prompt(["unet", 0], SKETCH)))


def _handles(env: Environment) -> tuple[Any, Any, Any]:
    ctx = RecordingContext(env)
    clip = CheckpointLoaderSimple().run(ctx, "mini.safetensors")[1]
    pos = CLIPTextEncode().run(ctx, "a house by a lake", clip)[0]
    neg = CLIPTextEncode().run(ctx, "blurry", clip)[0]
    return pos, neg, EmptyLatentImage().run(ctx, 64, 64, 1)[0]


def _ksample(env: Environment, model: Any, control: Control | None) -> torch.Tensor:
    pos, neg, latent = _handles(env)
    if control is not None:
        pos = [[e, o | {"control": control, "control_apply_to_uncond": False}] for e, o in pos]
        neg = [[e, o | {"control": control, "control_apply_to_uncond": False}] for e, o in neg]
    out = KSampler().run(RecordingContext(env), model, 42, 2, 7.0, "euler", "normal", pos, neg, latent, 1.0)
    samples: torch.Tensor = out[0]["samples"]
    return samples


def test_a_zero_strength_adapter_in_the_chain_adds_exactly_nothing(engine: Any, plain: torch.Tensor) -> None:
    """Below the node's strength-0 shortcut: the features times 0 added after the blocks."""
    env = engine.env
    model = UNETLoader().run(RecordingContext(env), UNET, "default")[0]
    net = ControlNetLoader().run(RecordingContext(env), SKETCH)[0]
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_ksample(env, model, Control(net, hint, 0.0)), _ksample(env, model, None))


def test_on_the_mini_sd15_unet_no_feature_fits_and_the_file_is_named(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The mini UNet's input block 2 is its level-0 downsample (320 x 4 x 4 for an 8 x 8 latent) where
    the adapter's first feature is 32 x 8 x 8; blocks 5, 8 and 11 do not exist. ComfyUI skips what
    does not fit (a console warning) and samples as without the adapter."""
    with caplog.at_level(logging.WARNING):
        got = sampled(engine, prompt(["ckpt", 0], SKETCH))
    assert torch.equal(got, sampled(engine, prompt(["ckpt", 0], None)))
    (record,) = [r for r in caplog.records if "T2I-Adapter" in r.getMessage()]
    assert SKETCH in record.getMessage() and "input block 2" in record.getMessage()


def test_an_sdxl_adapter_on_an_sd1_model_is_refused_naming_the_file(engine: Any) -> None:
    env = engine.env
    model = UNETLoader().run(RecordingContext(env), UNET, "default")[0]
    net = ControlNetLoader().run(RecordingContext(env), XL)[0]
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    refused = rf"T2I-Adapter '{XL}' is an SDXL T2I-Adapter .* pick one made for it"
    with pytest.raises(ValueError, match=refused):
        _ksample(env, model, Control(net, hint, 1.0))
