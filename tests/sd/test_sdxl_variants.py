"""SDXL-family depths, dtypes and markers read from the tensors: SSD-1B / Segmind Vega (a middle block
that is one res block, asymmetric output depths) and KOALA (one res block per level, no middle block)
shapes cut from the mini SDXL checkpoint, the same file stored as fp16, bf16 and fp32, and a
v-prediction file (NoobAI-XL v-pred's `v_pred` / `ztsnr` marker keys)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.loaders import CheckpointLoaderSimple
from nodes.model_advanced import ModelSamplingDiscrete
from nodes.sd.model_sampling import EPS, ModelSampling
from tests.sd.sdxl_files import VARIANTS, comfy_lists, render, write_depth_variant

pytestmark = pytest.mark.slow
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def variants_env(
    tmp_path_factory: pytest.TempPathFactory, mini_sdxl_checkpoint: Path
) -> Iterator[Environment]:
    base = tmp_path_factory.mktemp("sdxl_variants")
    ckpts = base / "models" / "checkpoints"
    write_depth_variant(mini_sdxl_checkpoint, ckpts / "ssd1b.safetensors", "ssd1b")
    for name, dtype in DTYPES.items():
        write_depth_variant(mini_sdxl_checkpoint, ckpts / f"koala_{name}.safetensors", "koala", dtype)
    write_depth_variant(mini_sdxl_checkpoint, ckpts / "mini.safetensors", "mini")
    # NoobAI-XL v-pred's markers: empty tensors named `v_pred` and `ztsnr` beside the weights
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    write_depth_variant(mini_sdxl_checkpoint, ckpts / "mini_vpred.safetensors", "mini", extra=markers)
    yield Environment(Folders.at(base))
    shutil.rmtree(base, ignore_errors=True)  # gigabytes of variants: not kept to the session's end


def _load(env: Environment, name: str) -> tuple[Any, Any, Any]:
    handles: tuple[Any, Any, Any] = CheckpointLoaderSimple().run(RecordingContext(env), name)
    return handles


@pytest.mark.parametrize(("variant", "name"), [("ssd1b", "ssd1b"), ("koala", "koala_fp16")])
def test_depths_are_read_from_the_tensors_and_the_model_samples(
    variants_env: Environment, variant: str, name: str
) -> None:
    model, clip, vae = handles = _load(variants_env, f"{name}.safetensors")
    assert model.family == clip.family == "sdxl"
    assert comfy_lists(model.unet.config) == VARIANTS[variant]
    latent, image = render(RecordingContext(variants_env), handles)
    assert latent.shape == (1, 4, 8, 8) and image.shape == (1, 64, 64, 3)
    assert torch.isfinite(latent).all() and 0.05 < float(image.std())


def test_a_kept_output_block_has_its_own_weights(variants_env: Environment) -> None:
    """koala's output block 1 is the mini's output block 2 (the one with the upsampler)."""
    model = _load(variants_env, "koala_fp16.safetensors")[0]
    path = variants_env.folders.resolve("checkpoints", "koala_fp16.safetensors")
    with safe_open(str(path), "pt") as f:
        up = f.get_tensor("model.diffusion_model.output_blocks.1.2.conv.weight").float()
    assert torch.equal(model.unet.up_blocks[0].upsamplers[0].conv.weight, up)
    assert model.unet.mid_block is None


def test_fp16_bf16_and_fp32_files_load_with_their_values(variants_env: Environment) -> None:
    handles = {name: _load(variants_env, f"koala_{name}.safetensors") for name in DTYPES}
    key = "time_embedding.linear_1.weight"
    fp16_weight = handles["fp16"][0].unet.state_dict()[key]
    for name, dtype in DTYPES.items():
        unet = handles[name][0].unet
        assert next(unet.parameters()).dtype == torch.float32
        assert torch.equal(unet.state_dict()[key], fp16_weight.to(dtype).float())
    # the fp32 file holds the fp16 file's values exactly: the same image, bit for bit
    ctx = RecordingContext(variants_env)
    latent16, image16 = render(ctx, handles["fp16"])
    latent32, image32 = render(ctx, handles["fp32"])
    assert torch.equal(latent16, latent32) and torch.equal(image16, image32)
    latent_bf, _ = render(ctx, handles["bf16"])
    assert torch.isfinite(latent_bf).all() and not torch.equal(latent_bf, latent16)


def test_a_v_pred_file_samples_as_the_node_would_make_it(variants_env: Environment) -> None:
    """`v_pred` + `ztsnr` (NoobAI-XL v-pred) give ModelSamplingDiscrete(v_prediction, zsnr) without
    the node: the image is the plain file's with the node, bit for bit, and not the eps image; the node
    set to eps on the marked file gives the plain file's eps image back."""
    ctx = RecordingContext(variants_env)
    plain, marked = (_load(variants_env, f"{n}.safetensors") for n in ("mini", "mini_vpred"))
    assert plain[0].sampling == EPS
    assert marked[0].sampling == ModelSampling("v_prediction", True)
    node = ModelSamplingDiscrete()
    as_vpred = (node.run(ctx, plain[0], "v_prediction", True)[0], *plain[1:])
    as_eps = (node.run(ctx, marked[0], "eps", False)[0], *marked[1:])
    latent_v, image_v = render(ctx, marked, steps=2)
    latent_node, image_node = render(ctx, as_vpred, steps=2)
    assert torch.equal(latent_v, latent_node) and torch.equal(image_v, image_node)
    latent_eps, _ = render(ctx, plain, steps=2)
    assert torch.isfinite(latent_v).all() and not torch.allclose(latent_v, latent_eps, atol=1e-3)
    assert torch.equal(render(ctx, as_eps, steps=2)[0], latent_eps)
