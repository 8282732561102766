"""ModelSave, CLIPSave, VAESave and CheckpointSave: ComfyUI's file names, key layouts and metadata,
checked against the checkpoint files' own tensors; whole files only, names inside the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from nodegraph.env import Environment
from nodegraph.folders import Folders, PathEscapeError
from nodegraph.testing import RecordingContext
from nodes import model_save
from nodes.merge import ModelMergeSimple
from nodes.model_save import CheckpointSave, CLIPSave, ModelSave, VAESave
from nodes.sd.checkpoint import load_checkpoint
from nodes.sd.handles import ClipHandle, ModelHandle, VaeHandle

UNET, VAE, TE = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


@pytest.fixture(scope="module")
def mini(mini_checkpoint: Path) -> Any:
    return load_checkpoint(mini_checkpoint)


@pytest.fixture
def ctx(tmp_path: Path) -> RecordingContext:
    return RecordingContext(Environment(Folders.at(tmp_path)))


def handles(ckpt: Any, name: str) -> tuple[ModelHandle, ClipHandle, VaeHandle]:
    return (
        ModelHandle(ckpt.unet, name, ckpt.family),
        ClipHandle(ckpt.text_encoder, None, name, ckpt.family),
        VaeHandle(ckpt.vae, name),
    )


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_model_save_writes_the_merged_unet_in_comfyuis_layout(
    ctx: RecordingContext, tmp_path: Path, mini: Any, mini_checkpoint: Path, mini_checkpoint_seed1: Path
) -> None:
    other = load_checkpoint(mini_checkpoint_seed1)
    model, _, _ = handles(mini, "a")
    (merged,) = ModelMergeSimple().run(ctx, model, handles(other, "b")[0], 0.3)
    ModelSave().run(ctx, merged, "diffusion_models/ComfyUI", prompt={"1": {}})
    state, meta = read(tmp_path / "output" / "diffusion_models" / "ComfyUI_00001_.safetensors")
    assert meta == {"modelspec.predict_key": "epsilon", "prompt": '{"1": {}}'}  # SD1.x: no ModelSpec
    with safe_open(mini_checkpoint, "pt") as f1, safe_open(mini_checkpoint_seed1, "pt") as f2:
        unet_keys = {k for k in f1.keys() if k.startswith(UNET)}
        assert set(state) == unet_keys
        for key in unet_keys:
            want = f1.get_tensor(key).float() * 0.3 + 0.7 * f2.get_tensor(key).float()
            assert torch.equal(state[key], want.half()), key


def test_clip_and_vae_save_the_original_weights(
    ctx: RecordingContext, tmp_path: Path, mini: Any, mini_checkpoint: Path
) -> None:
    _, clip, vae = handles(mini, "a")
    CLIPSave().run(ctx, clip, "clip/ComfyUI")
    VAESave().run(ctx, vae, "vae/ComfyUI_vae", extra_pnginfo={"workflow": {"nodes": []}})
    clip_state, clip_meta = read(tmp_path / "output" / "clip" / "ComfyUI_clip_l_00001_.safetensors")
    vae_state, vae_meta = read(tmp_path / "output" / "vae" / "ComfyUI_vae_00001_.safetensors")
    assert clip_meta == {"format": "pt", "prompt": ""}
    assert vae_meta == {"prompt": "", "workflow": '{"nodes": []}'}
    assert float(clip_state.pop("logit_scale")) == pytest.approx(4.6055, abs=2e-3)
    with safe_open(mini_checkpoint, "pt") as f:
        te = {k[len(TE) :] for k in f.keys() if k.startswith(TE) and not k.endswith("position_ids")}
        assert set(clip_state) == te
        assert all(torch.equal(clip_state[k], f.get_tensor(TE + k)) for k in te)
        vae_keys = {k[len(VAE) :] for k in f.keys() if k.startswith(VAE)}
        assert set(vae_state) == vae_keys
        assert all(torch.equal(vae_state[k], f.get_tensor(VAE + k).float()) for k in vae_keys)
    assert next(iter(vae_state.values())).dtype == torch.float32


def test_checkpoint_save_metadata_is_comfyuis_for_sd1(
    ctx: RecordingContext, tmp_path: Path, mini: Any
) -> None:
    CheckpointSave().run(ctx, *handles(mini, "a"), "checkpoints/ComfyUI")
    _, meta = read(tmp_path / "output" / "checkpoints" / "ComfyUI_00001_.safetensors")
    assert meta == {"modelspec.predict_key": "epsilon", "prompt": ""}


def test_saves_are_whole_files_under_free_names(
    ctx: RecordingContext, tmp_path: Path, mini: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, vae = handles(mini, "a")
    folder = tmp_path / "output" / "vae"
    folder.mkdir(parents=True)
    (folder / "x_00001_.safetensors").write_bytes(b"someone else's")
    VAESave().run(ctx, vae, "vae/x")
    assert (folder / "x_00001_.safetensors").read_bytes() == b"someone else's"
    assert (folder / "x_00002_.safetensors").is_file()

    def crash(*args: Any, **kwargs: Any) -> None:
        Path(args[1]).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        VAESave().run(ctx, vae, "vae/x")
    assert sorted(p.name for p in folder.iterdir()) == ["x_00001_.safetensors", "x_00002_.safetensors"]


def test_names_outside_the_output_folder_and_wrong_inputs_are_refused(
    ctx: RecordingContext, mini: Any
) -> None:
    model, clip, vae = handles(mini, "a")
    for node, value in ((ModelSave(), model), (CLIPSave(), clip), (VAESave(), vae)):
        with pytest.raises(PathEscapeError, match="outside the output folder"):
            node.run(ctx, value, "../../escape")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="CLIPSave: input clip"):
        CLIPSave().run(ctx, model, "clip/x")  # type: ignore[arg-type]
    assert model_save.LOGIT_SCALE == 4.6055


def test_sdxl_clip_save_writes_both_encoders(
    tmp_path: Path, sdxl_store: Any, mini_sdxl_checkpoint: Path
) -> None:
    ctx = RecordingContext(Environment(Folders.at(tmp_path)))
    ckpt = sdxl_store.checkpoint(mini_sdxl_checkpoint)
    clip = ClipHandle(ckpt.text_encoder, None, "xl", ckpt.family, text_encoder_2=ckpt.text_encoder_2)
    CLIPSave().run(ctx, clip, "clip/xl")
    clip_l, _ = read(tmp_path / "output" / "clip" / "xl_clip_l_00001_.safetensors")
    clip_g, _ = read(tmp_path / "output" / "clip" / "xl_clip_g_00001_.safetensors")
    assert "text_projection.weight" in clip_g and "text_projection.weight" not in clip_l
    g = "conditioner.embedders.1.model."
    with safe_open(mini_sdxl_checkpoint, "pt") as f:
        assert torch.equal(
            clip_g["text_projection.weight"], f.get_tensor(g + "text_projection").t().contiguous()
        )
        qkv = f.get_tensor(g + "transformer.resblocks.0.attn.in_proj_weight")
        assert torch.equal(
            clip_g["text_model.encoder.layers.0.self_attn.q_proj.weight"], qkv[: qkv.shape[0] // 3]
        )
        l_key = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
        assert torch.equal(clip_l["text_model.final_layer_norm.weight"], f.get_tensor(l_key))
