"""UNETLoader, CLIPLoader, DualCLIPLoader and CheckpointLoader on files cut from the oracle's mini
checkpoints: the parts they load are the checkpoint's own (same weights, same config, same outputs),
through the model store, and wrong files or types are refused naming the file and what it is.

The part files are written here from the checkpoints' tensors: the UNet in three layouts (LDM with
and without `model.diffusion_model.`, diffusers' names as `save_pretrained` writes them), CLIP-L in
transformers' layout as ComfyUI's `clip_l.safetensors` ships, SDXL's bigG in open_clip's layout and
in transformers' layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes.component_loaders import CLIPLoader, DualCLIPLoader, UNETLoader
from nodes.conditioning import CLIPTextEncode
from nodes.loaders import CheckpointLoader, CheckpointLoaderSimple, model_store
from nodes.sd.checkpoint import CheckpointError
from nodes.sd.float8 import storage_dtype
from nodes.sd.handles import ClipHandle, ModelHandle

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."


def _part(src: Path, dest: Path, keep: str, strip: str = "") -> Path:
    with safe_open(str(src), framework="pt") as f:
        tensors = {k.removeprefix(strip): f.get_tensor(k) for k in f.keys() if k.startswith(keep)}
    save_file(tensors, str(dest))
    return dest


@pytest.fixture(scope="module")
def parts_env(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Iterator[Environment]:
    """models/checkpoints/mini.safetensors, its UNet in models/unet (bare LDM) and
    models/diffusion_models (prefixed LDM, diffusers layout), its CLIP-L in models/text_encoders."""
    base = tmp_path_factory.mktemp("parts")
    for sub in ("checkpoints", "unet", "diffusion_models", "text_encoders", "clip", "configs", "embeddings"):
        (base / "models" / sub).mkdir(parents=True)
    models = base / "models"
    (models / "checkpoints" / "mini.safetensors").symlink_to(mini_checkpoint)
    _part(mini_checkpoint, models / "unet" / "bare.safetensors", UNET, UNET)
    _part(mini_checkpoint, models / "diffusion_models" / "prefixed.safetensors", UNET)
    _part(mini_checkpoint, models / "text_encoders" / "clip_l.safetensors", TE, TE)
    (models / "checkpoints" / "unet_only.safetensors").symlink_to(models / "unet" / "bare.safetensors")
    env = Environment(Folders.at(base))
    ctx = RecordingContext(env)
    model, _, _ = CheckpointLoaderSimple().run(ctx, "mini.safetensors")
    state = {k: v.to(torch.float16) for k, v in model.unet.state_dict().items()}
    save_file(state, str(models / "diffusion_models" / "diffusers.safetensors"))
    yield env


def _checkpoint(env: Environment) -> tuple[ModelHandle, ClipHandle, Any]:
    return CheckpointLoaderSimple().run(RecordingContext(env), "mini.safetensors")


def _forward(unet: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 768, generator=gen)
    with torch.inference_mode():
        out: torch.Tensor = unet(x, torch.tensor([500.0]), encoder_hidden_states=context, return_dict=False)[
            0
        ]
    return out


def test_unet_loader_lists_both_folders_and_loads_the_checkpoints_unet(parts_env: Environment) -> None:
    names = UNETLoader.info(parts_env)["input"]["required"]["unet_name"][0]
    assert names == ["bare.safetensors", "diffusers.safetensors", "prefixed.safetensors"]
    reference, _, _ = _checkpoint(parts_env)
    want_state, want_out = reference.unet.state_dict(), _forward(reference.unet)
    ctx = RecordingContext(parts_env)
    for name in names:
        (model,) = UNETLoader().run(ctx, name, "default")
        assert model.family == "sd15" and model.source == name
        assert dict(model.unet.config) == dict(reference.unet.config), name
        state = model.unet.state_dict()
        assert state.keys() == want_state.keys()
        assert all(torch.equal(state[k], want_state[k]) for k in state), name
        assert torch.equal(_forward(model.unet), want_out), name


def test_unet_loader_shares_one_load_per_file_and_dtype_and_rounds_fp8(parts_env: Environment) -> None:
    ctx = RecordingContext(parts_env)
    store = model_store(parts_env)
    (a,) = UNETLoader().run(ctx, "bare.safetensors", "default")
    loads = store.loads
    (b,) = UNETLoader().run(ctx, "bare.safetensors", "default")
    assert b.unet is a.unet and store.loads == loads  # read once, shared
    (fp8,) = UNETLoader().run(ctx, "bare.safetensors", "fp8_e4m3fn")
    (fast,) = UNETLoader().run(ctx, "bare.safetensors", "fp8_e4m3fn_fast")
    (e5m2,) = UNETLoader().run(ctx, "bare.safetensors", "fp8_e5m2")
    assert store.loads == loads + 3 and fp8.unet is not a.unet
    # marked as fp8 storage, so a LoRA on it is rounded back to fp8 as ComfyUI does (test_float8.py)
    assert [storage_dtype(h.unet) for h in (a, fp8, fast, e5m2)] == [
        None,
        torch.float8_e4m3fn,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    ]
    for handle, dtype in ((fp8, torch.float8_e4m3fn), (fast, torch.float8_e4m3fn), (e5m2, torch.float8_e5m2)):
        for (name, got), want in zip(handle.unet.named_parameters(), a.unet.parameters(), strict=True):
            assert got.dtype == torch.float32
            assert torch.equal(got, want.to(dtype).float()), name
    w = dict(a.unet.named_parameters())["conv_in.weight"]
    assert not torch.equal(dict(fp8.unet.named_parameters())["conv_in.weight"], w)  # rounding happened


def test_a_full_checkpoint_given_to_unet_loader_gives_its_unet(
    parts_env: Environment, tmp_path: Path, mini_checkpoint: Path
) -> None:
    from nodes.sd.unet_file import load_unet_file

    loaded = load_unet_file(mini_checkpoint)
    reference, _, _ = _checkpoint(parts_env)
    assert loaded.family == "sd15" and torch.equal(_forward(loaded.unet), _forward(reference.unet))


def test_wrong_files_are_refused_naming_them(parts_env: Environment, tmp_path: Path) -> None:
    from nodes.sd.unet_file import load_unet_file

    clip_file = parts_env.folders.resolve("text_encoders", "clip_l.safetensors")
    with pytest.raises(CheckpointError, match="'clip_l.safetensors' is not a UNet: it is a text encoder"):
        load_unet_file(clip_file)
    sd2 = tmp_path / "sd2_unet.safetensors"
    save_file(
        {
            f"{UNET}input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            f"{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
        },
        str(sd2),
    )
    with pytest.raises(CheckpointError, match="'sd2_unet.safetensors' is an SD2.x UNet"):
        load_unet_file(sd2)
    # a UNet-only file given to the checkpoint loader says where it belongs
    with pytest.raises(CheckpointError, match="'unet_only.safetensors' .*a UNet alone.*UNETLoader"):
        CheckpointLoaderSimple().run(RecordingContext(parts_env), "unet_only.safetensors")


def test_clip_loader_gives_the_checkpoints_text_encoder(parts_env: Environment) -> None:
    ctx = RecordingContext(parts_env)
    _, reference, _ = _checkpoint(parts_env)
    (clip,) = CLIPLoader().run(ctx, "clip_l.safetensors", "stable_diffusion")
    assert clip.family == "sd15" and clip.text_encoder_2 is None
    (want,) = CLIPTextEncode().run(ctx, "a lighthouse at dusk, (oil painting:1.2)", reference)
    (got,) = CLIPTextEncode().run(ctx, "a lighthouse at dusk, (oil painting:1.2)", clip)
    assert torch.equal(got[0][0], want[0][0])
    (on_cpu,) = CLIPLoader().run(ctx, "clip_l.safetensors", "stable_diffusion", "cpu")
    assert on_cpu.extra == {"device": "cpu"}
    (cpu_cond,) = CLIPTextEncode().run(ctx, "a lighthouse at dusk, (oil painting:1.2)", on_cpu)
    assert torch.equal(cpu_cond[0][0], want[0][0])
    spec = CLIPLoader.info(parts_env)["input"]
    assert spec["optional"]["device"] == [["default", "cpu"], {"advanced": True}]


def test_clip_loaders_refuse_other_families_and_wrong_files(parts_env: Environment) -> None:
    ctx = RecordingContext(parts_env)
    problem = CLIPLoader.check_inputs(parts_env, clip_name="clip_l.safetensors", type="sd3")
    assert problem is not None and "type 'sd3' is for a model family nodegraph does not run" in problem
    assert DualCLIPLoader.check_inputs(parts_env, type="flux") is not None
    assert DualCLIPLoader.check_inputs(parts_env, type="sdxl") is None
    with pytest.raises(CheckpointError, match="DualCLIPLoader type 'flux'"):
        DualCLIPLoader().run(ctx, "clip_l.safetensors", "clip_l.safetensors", "flux")
    with pytest.raises(CheckpointError, match="'clip_l.safetensors' are both CLIP-L"):
        DualCLIPLoader().run(ctx, "clip_l.safetensors", "clip_l.safetensors", "sdxl")
    (parts_env.folders.paths("text_encoders")[0] / "unet.safetensors").symlink_to(
        parts_env.folders.resolve("diffusion_models", "prefixed.safetensors")
    )
    with pytest.raises(CheckpointError, match="'unet.safetensors' is not a CLIP text encoder: it is a full"):
        CLIPLoader().run(ctx, "unet.safetensors", "stable_diffusion")


def test_checkpoint_loader_reads_v_prediction_and_layer_idx_from_its_config(parts_env: Environment) -> None:
    configs = parts_env.folders.paths("configs")[0]
    (configs / "v-layer.yaml").write_text(
        "model:\n  params:\n    parameterization: v\n    scale_factor: 0.18215\n"
        "    cond_stage_config:\n      target: x\n      params:\n        layer_idx: -2\n"
    )
    (configs / "plain.yaml").write_text("model:\n  params:\n    cond_stage_config:\n      target: x\n")
    (configs / "broken.yaml").write_text("model: {}\n")
    info = CheckpointLoader.info(parts_env)
    assert info["input"]["required"]["config_name"][0] == ["broken.yaml", "plain.yaml", "v-layer.yaml"]
    assert info["deprecated"] is True
    ctx = RecordingContext(parts_env)
    model, clip, vae = CheckpointLoader().run(ctx, "v-layer.yaml", "mini.safetensors")
    simple_model, simple_clip, simple_vae = _checkpoint(parts_env)
    assert model.unet is simple_model.unet and vae.vae is simple_vae.vae
    assert model.sampling.prediction == "v_prediction" and clip.layer_idx == -2
    plain_model, plain_clip, _ = CheckpointLoader().run(ctx, "plain.yaml", "mini.safetensors")
    assert plain_model.sampling == simple_model.sampling and plain_clip.layer_idx is None
    with pytest.raises(ValueError, match="config 'broken.yaml' is not an LDM model config"):
        CheckpointLoader().run(ctx, "broken.yaml", "mini.safetensors")


def test_sdxl_parts_load_as_the_checkpoints(tmp_path: Path, mini_sdxl_checkpoint: Path) -> None:
    """The SDXL UNet (bare LDM, then the same in diffusers' layout), CLIP-L and bigG (open_clip's
    layout and transformers') give the weights the checkpoint holds, without loading the checkpoint."""
    from nodes.sd import convert_sdxl
    from nodes.sd.checkpoint import _LDM_NAMES

    base = tmp_path
    models = base / "models"
    for sub in ("diffusion_models", "text_encoders"):
        (models / sub).mkdir(parents=True)
    src = mini_sdxl_checkpoint
    _part(src, models / "diffusion_models" / "unet.safetensors", UNET, UNET)
    l_prefix = convert_sdxl.CLIP_L_PREFIX[: -len("text_model.")]
    _part(src, models / "text_encoders" / "clip_l.safetensors", l_prefix, l_prefix)
    _part(
        src,
        models / "text_encoders" / "clip_g_open.safetensors",
        convert_sdxl.CLIP_G_BASE,
        convert_sdxl.CLIP_G_BASE,
    )
    env = Environment(Folders.at(base))
    ctx = RecordingContext(env)
    (model,) = UNETLoader().run(ctx, "unet.safetensors", "default")
    assert model.family == "sdxl" and model.unet.config.addition_embed_type == "text_time"
    names = _LDM_NAMES[model.unet]
    with safe_open(str(src), framework="pt") as f:
        params = dict(model.unet.named_parameters())
        for ldm, param in list(names.items())[::7]:
            assert torch.equal(params[param], f.get_tensor(ldm).float().reshape(params[param].shape)), ldm
    state = {k: v.to(torch.float16) for k, v in model.unet.state_dict().items()}
    save_file(state, str(models / "diffusion_models" / "unet_diffusers.safetensors"))
    (again,) = UNETLoader().run(ctx, "unet_diffusers.safetensors", "default")
    assert again.family == "sdxl" and dict(again.unet.config) == dict(model.unet.config)
    assert all(
        torch.equal(a, b) for a, b in zip(again.unet.parameters(), model.unet.parameters(), strict=True)
    )
    del model, again, state

    (clip,) = DualCLIPLoader().run(ctx, "clip_g_open.safetensors", "clip_l.safetensors", "sdxl")
    assert clip.family == "sdxl" and clip.text_encoder is not None and clip.text_encoder_2 is not None
    g = clip.text_encoder_2
    with safe_open(str(src), framework="pt") as f:
        fused = f.get_tensor(f"{convert_sdxl.CLIP_G_BASE}transformer.resblocks.3.attn.in_proj_weight")
        k_rows = fused[fused.shape[0] // 3 : 2 * fused.shape[0] // 3]
        k_proj = g.text_model.encoder.layers[3].self_attn.k_proj.weight
        assert torch.equal(k_proj, k_rows.to(torch.float16).float())
        projection = f.get_tensor(f"{convert_sdxl.CLIP_G_BASE}text_projection")
        assert torch.equal(g.text_projection.weight, projection.t().to(torch.float16).float())
        l_key = f"{convert_sdxl.CLIP_L_PREFIX}encoder.layers.5.mlp.fc1.weight"
        assert torch.equal(clip.text_encoder.encoder.layers[5].mlp.fc1.weight, f.get_tensor(l_key).float())
    hf_state = {k: v.to(torch.float16) for k, v in g.state_dict().items() if not k.endswith("position_ids")}
    save_file(hf_state, str(models / "text_encoders" / "clip_g_hf.safetensors"))
    del clip, g, hf_state
    (refiner,) = CLIPLoader().run(ctx, "clip_g_hf.safetensors", "stable_diffusion")
    assert refiner.family == "sdxl_refiner" and refiner.text_encoder is None
    assert refiner.text_encoder_2.config.num_hidden_layers == 32
    assert torch.equal(refiner.text_encoder_2.text_model.encoder.layers[3].self_attn.k_proj.weight, k_proj)
