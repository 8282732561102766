"""SDXL ControlNets through the nodes, on the mini SDXL UNet (two-layer text encoders, so it loads in
seconds): the original/SGM layout (with and without A1111's `control_model.` prefix), diffusers'
layout (controlnet-canny-sdxl-1.0's, and its reduced-depth -small / -mid), and a Stability-style
control LoRA, each written by the generators of `tests/sd/sdxl_controlnet_files.py` and read by
ControlNetLoader exactly as a downloaded file is; family mismatches refused naming the file."""

from __future__ import annotations

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
from nodes.image import VAEDecode
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.lora import LoraLoaderModelOnly
from nodes.sampling import KSampler
from nodes.sd.checkpoint import ldm_names
from nodes.sd.controlnet import ControlModel
from nodes.sd.patcher import branched, patched
from tests.sd.sdxl_controlnet_files import (
    VARIANTS,
    checkpoint_encoder,
    controlnet_specs,
    merged_control_lora,
    write_control_lora,
    write_diffusers,
    write_sgm,
)
from tests.sd.sdxl_files import write_depth_variant

pytestmark = pytest.mark.slow
HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
SGM, A1111 = "xl_canny_sgm.safetensors", "xl_canny_a1111.safetensors"
DIFFUSERS = "controlnet-canny-sdxl-mini.safetensors"
CONTROL_LORA, MERGED = "control-lora-canny-rank8.safetensors", "control-lora-merged.safetensors"
LORA = "mini_sdxl_lora.safetensors"


@pytest.fixture(scope="module")
def xl_env(
    tmp_path_factory: pytest.TempPathFactory,
    oracle_dir: Path,
    mini_sdxl_checkpoint: Path,
    mini_checkpoint: Path,
    mini_controlnet: Path,
    mini_sdxl_loras: Path,
) -> Iterator[Environment]:
    base = tmp_path_factory.mktemp("sdxl_controlnet")
    ckpts, nets = base / "models" / "checkpoints", base / "models" / "controlnet"
    write_depth_variant(mini_sdxl_checkpoint, ckpts / "mini_xl.safetensors", "mini")
    (ckpts / "mini_sd15.safetensors").symlink_to(mini_checkpoint)
    write_sgm(oracle_dir, nets / SGM)
    write_sgm(oracle_dir, nets / A1111, prefix="control_model.")
    write_diffusers(oracle_dir, nets / DIFFUSERS)
    write_control_lora(oracle_dir, nets / CONTROL_LORA)
    merged_control_lora(oracle_dir, checkpoint_encoder(oracle_dir, mini_sdxl_checkpoint), nets / MERGED)
    (nets / mini_controlnet.name).symlink_to(mini_controlnet)
    (base / "models" / "loras").mkdir(parents=True)
    (base / "models" / "loras" / LORA).symlink_to(mini_sdxl_loras / LORA)
    yield Environment(Folders.at(base))
    shutil.rmtree(base, ignore_errors=True)  # gigabytes of variants: not kept to the session's end


def _handles(env: Environment, name: str) -> tuple[Any, Any, Any]:
    handles: tuple[Any, Any, Any] = CheckpointLoaderSimple().run(RecordingContext(env), name)
    return handles


def _net(env: Environment, name: str) -> ControlModel:
    net: ControlModel = ControlNetLoader().run(RecordingContext(env), name)[0]
    return net


def _render(env: Environment, handles: Any, control: str | None, strength: float = 0.9) -> Any:
    """(latent, image) of a 1-step euler txt2img at 64x64 (cfg 7: cond and uncond in one batch), with
    ControlNetApplyAdvanced when asked."""
    ctx = RecordingContext(env)
    model, clip, vae = handles
    pos = CLIPTextEncode().run(ctx, "a photo of a cat sitting on a red chair", clip)[0]
    neg = CLIPTextEncode().run(ctx, "blurry", clip)[0]
    if control is not None:
        pos, neg = ControlNetApplyAdvanced().run(ctx, pos, neg, _net(env, control), HINT, strength, 0.0, 1.0)
    latent = EmptyLatentImage().run(ctx, 64, 64, 1)[0]
    out = KSampler().run(ctx, model, 42, 1, 7.0, "euler", "normal", pos, neg, latent, 1.0)[0]
    return out["samples"], VAEDecode().run(ctx, out, vae)[0]


def test_sgm_a1111_and_diffusers_layouts_load_as_one_sdxl_controlnet(
    xl_env: Environment, oracle_dir: Path
) -> None:
    sgm = _net(xl_env, SGM)
    assert (sgm.family, sgm.context_dim, sgm.lora) == ("sdxl", 2048, None)
    config = sgm.net.config
    assert tuple(config.block_out_channels) == (320, 320, 640)
    assert tuple(config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(config.transformer_layers_per_block)[1:] == (1, 2)  # level 0 has no attention
    assert config.addition_embed_type == "text_time"
    assert tuple(config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    want = sgm.net.state_dict()
    assert len(want) == len(controlnet_specs(oracle_dir))  # every tensor of the file, no other
    for name in (A1111, DIFFUSERS):
        other = _net(xl_env, name)
        assert (other.family, other.context_dim) == ("sdxl", 2048)
        got = other.net.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


@pytest.fixture(scope="module")
def plain(xl_env: Environment) -> Any:
    """The mini SDXL's image without ControlNet."""
    return _render(xl_env, _handles(xl_env, "mini_xl.safetensors"), None)


def test_an_sdxl_controlnet_steers_the_sdxl_image(xl_env: Environment, plain: Any) -> None:
    plain_latent, plain_image = plain
    latent, image = _render(xl_env, _handles(xl_env, "mini_xl.safetensors"), SGM)
    assert torch.isfinite(latent).all() and 0.05 < float(image.std())
    assert not torch.allclose(latent, plain_latent, atol=1e-2, rtol=0)
    assert float((image - plain_image).abs().max()) > 0.02
    # strength 0 returns the conditioning untouched, as ComfyUI does
    pos, neg = [[torch.zeros(1, 77, 2048), {}]], [[torch.zeros(1, 77, 2048), {}]]
    got = ControlNetApplyAdvanced().run(
        RecordingContext(xl_env), pos, neg, _net(xl_env, SGM), HINT, 0.0, 0.0, 1.0
    )
    assert got[0] is pos and got[1] is neg


def test_reduced_depth_diffusers_controlnets_steer_the_image_and_strength_0_is_none(
    xl_env: Environment, oracle_dir: Path, plain: Any
) -> None:
    """controlnet-canny-sdxl-1.0-small / -mid shaped files (depth-0 transformers, tests/sd/
    test_sdxl_controlnet_variants.py for their config and residuals) through ControlNetLoader and
    ControlNetApplyAdvanced: each changes the image; at strength 0 the image is the plain one."""
    nets = xl_env.folders.resolve("controlnet", SGM).parent
    handles = _handles(xl_env, "mini_xl.safetensors")
    plain_latent, plain_image = plain
    for variant in VARIANTS:
        name = f"controlnet-canny-sdxl-mini-{variant}.safetensors"
        write_diffusers(oracle_dir, nets / name, variant)
        latent, image = _render(xl_env, handles, name)
        assert torch.isfinite(latent).all() and 0.05 < float(image.std()), variant
        assert not torch.allclose(latent, plain_latent, atol=1e-2, rtol=0), variant
        assert float((image - plain_image).abs().max()) > 0.02, variant
    latent, image = _render(xl_env, handles, name, strength=0.0)
    assert torch.equal(latent, plain_latent) and torch.equal(image, plain_image)


def test_a_control_lora_runs_as_the_controlnet_it_makes_on_the_sampled_unet(
    xl_env: Environment, plain: Any
) -> None:
    """ComfyUI's ControlLora: the UNet's encoder weights plus up @ down, the file's full tensors on top;
    the same image as the merged full ControlNet written by the generator."""
    lora = _net(xl_env, CONTROL_LORA)
    assert (lora.net, lora.family, lora.context_dim) == (None, "sdxl", 2048) and lora.lora is not None
    handles = _handles(xl_env, "mini_xl.safetensors")
    latent, image = _render(xl_env, handles, CONTROL_LORA)
    merged_latent, merged_image = _render(xl_env, handles, MERGED)
    assert torch.allclose(latent, merged_latent, rtol=0, atol=1e-5 * float(merged_latent.abs().max()))
    assert torch.allclose(image, merged_image, rtol=0, atol=1e-5)
    assert not torch.allclose(latent, plain[0], atol=1e-2, rtol=0)


def test_a_control_lora_is_built_on_the_unet_with_the_models_loras_merged(
    xl_env: Environment, oracle_dir: Path
) -> None:
    """ComfyUI builds a control LoRA in pre_run, after the model's LoRAs are patched in: with a UNet LoRA
    at 0.5 on the model, right after a run at 0.7 (a strength change, which the sampler would otherwise
    run as runtime branches on unchanged weights), it is the merge on the 0.5-patched weights."""
    ctx = RecordingContext(xl_env)
    model, clip, vae = _handles(xl_env, "mini_xl.safetensors")
    at_07, at_05 = (LoraLoaderModelOnly().run(ctx, model, LORA, s)[0] for s in (0.7, 0.5))
    with torch.inference_mode(), patched(at_05.unet, at_05.loras, target="unet", exact=True) as unet:
        params = dict(unet.named_parameters())
        names = ldm_names(unet)
        assert names is not None
        patched_weights = {ldm: params[p].detach().clone() for ldm, p in names.items()}
    merged = xl_env.folders.resolve("controlnet", SGM).parent / "control-lora-merged-on-lora05.safetensors"
    merged_control_lora(oracle_dir, patched_weights, merged)
    with torch.inference_mode():
        with patched(at_07.unet, at_07.loras, target="unet", exact=True):  # the LoRA now fused at 0.7
            pass
        with patched(at_05.unet, at_05.loras, target="unet"):
            assert branched(at_05.unet) > 0  # what a plain strength change does: 0.7 fused + branches
        with patched(at_07.unet, at_07.loras, target="unet"):
            assert branched(at_07.unet) == 0  # back at 0.7: the sampler's next 0.5 would branch again
    latent, image = _render(xl_env, (at_05, clip, vae), CONTROL_LORA)
    want_latent, want_image = _render(xl_env, (at_05, clip, vae), merged.name)
    assert torch.allclose(latent, want_latent, rtol=0, atol=1e-5 * float(want_latent.abs().max()))
    assert torch.allclose(image, want_image, rtol=0, atol=1e-5)
    unpatched_latent, _ = _render(xl_env, (at_05, clip, vae), MERGED)
    assert not torch.allclose(latent, unpatched_latent, atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("checkpoint", "control", "says"),
    [
        ("mini_xl.safetensors", "mini_controlnet.safetensors", "'mini_controlnet.safetensors' is an SD1.x"),
        ("mini_sd15.safetensors", SGM, f"'{SGM}' is an SDXL ControlNet"),
        ("mini_sd15.safetensors", DIFFUSERS, f"'{DIFFUSERS}' is an SDXL ControlNet"),
        ("mini_sd15.safetensors", CONTROL_LORA, f"'{CONTROL_LORA}' is an SDXL control LoRA"),
    ],
)
def test_a_controlnet_of_another_family_is_refused_naming_the_file(
    xl_env: Environment, checkpoint: str, control: str, says: str
) -> None:
    handles = _handles(xl_env, checkpoint)
    with pytest.raises(ValueError, match=says):
        _render(xl_env, handles, control)
