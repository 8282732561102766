"""Checkpoint loading: family detection, config from shapes, the LDM key map, and bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nodes.sd import convert
from nodes.sd.checkpoint import (
    CheckpointError,
    DictSource,
    LoadedCheckpoint,
    assign_weights,
    layout_errors,
    load_checkpoint,
    load_pickle_weights,
    load_vae_file,
)


def test_mini_checkpoint_is_sd15_with_the_oracle_unet_config(loaded_mini: LoadedCheckpoint) -> None:
    cfg = loaded_mini.unet.config
    assert loaded_mini.family == "sd15"
    assert tuple(cfg.block_out_channels) == (320, 640)
    assert cfg.layers_per_block == 1
    assert tuple(cfg.down_block_types) == ("CrossAttnDownBlock2D", "DownBlock2D")
    assert tuple(cfg.up_block_types) == ("UpBlock2D", "CrossAttnUpBlock2D")
    assert cfg.cross_attention_dim == 768 and cfg.attention_head_dim == 8
    assert loaded_mini.text_encoder.config.num_hidden_layers == 12
    assert loaded_mini.vae.config.latent_channels == 4


def test_every_weight_equals_the_file_tensor_under_its_mapped_name(
    loaded_mini: LoadedCheckpoint, mini_checkpoint: Path
) -> None:
    modules = {"unet": loaded_mini.unet, "vae": loaded_mini.vae, "te": loaded_mini.text_encoder}
    params = {c: dict(m.named_parameters()) for c, m in modules.items()}
    with safe_open(str(mini_checkpoint), framework="pt") as f:
        file_keys = set(f.keys())
        assert set(loaded_mini.ldm_keys) == file_keys  # every key is used, none invented
        for ldm_key, (component, name) in loaded_mini.ldm_keys.items():
            param = params[component][name]
            expected = f.get_tensor(ldm_key).to(torch.float32).reshape(param.shape)
            assert param.dtype == torch.float32
            assert torch.equal(param, expected), ldm_key
    mapped = {(c, n) for c, n in loaded_mini.ldm_keys.values()}
    assert mapped == {(c, n) for c, p in params.items() for n in p}


def test_no_parameter_or_buffer_is_left_on_the_meta_device(loaded_mini: LoadedCheckpoint) -> None:
    for module in (loaded_mini.unet, loaded_mini.vae, loaded_mini.text_encoder):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert not tensor.is_meta, name


def test_text_encoder_weights_are_rounded_to_fp16_values() -> None:
    from nodes.sd.checkpoint import _to_fp16_rounded

    module = torch.nn.Linear(2, 2, device="meta")
    w = torch.tensor([[1.0 + 2**-12, 0.1], [3.0, -1e-9]])
    source = DictSource({"w": w, "b": torch.zeros(2)})
    assign_weights(module, {"weight": "w", "bias": "b"}, source, "x.safetensors", "te", _to_fp16_rounded)
    assert module.weight.dtype == torch.float32
    assert torch.equal(module.weight, w.half().float())
    assert not torch.equal(module.weight, w)


def _ldm_keys(mini_checkpoint: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(mini_checkpoint), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_sdxl_and_sd2_are_refused_by_name_inpainting_is_sd15(mini_checkpoint: Path) -> None:
    shapes = _ldm_keys(mini_checkpoint)
    sdxl = {**shapes, "conditioner.embedders.0.transformer.text_model.x": (1,)}
    with pytest.raises(convert.UnsupportedCheckpointError, match="'a.safetensors' is an SDXL checkpoint"):
        convert.detect_family("a.safetensors", sdxl, sdxl.__getitem__)
    sd2 = {**shapes, "cond_stage_model.model.token_embedding.weight": (49408, 1024)}
    with pytest.raises(convert.UnsupportedCheckpointError, match="SD2.x"):
        convert.detect_family("b.safetensors", sd2, sd2.__getitem__)
    inpaint = {**shapes, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
    assert convert.detect_family("c.safetensors", inpaint, inpaint.__getitem__) == "sd15"
    odd = {**shapes, "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}
    with pytest.raises(convert.UnsupportedCheckpointError, match="'e.safetensors' has an unknown UNet"):
        convert.detect_family("e.safetensors", odd, odd.__getitem__)
    assert convert.detect_family("d.safetensors", shapes, shapes.__getitem__) == "sd15"


def test_unet_depths_are_read_from_keys_for_a_standard_sd15_layout() -> None:
    shapes: dict[str, tuple[int, ...]] = {}
    p = "model.diffusion_model."
    shapes[p + "input_blocks.0.0.weight"] = (320, 4, 3, 3)
    shapes[p + "out.2.weight"] = (4, 320, 3, 3)
    n = 1
    for level, ch in enumerate((320, 640, 1280, 1280)):
        for _ in range(2):
            shapes[f"{p}input_blocks.{n}.0.out_layers.3.weight"] = (ch, ch, 3, 3)
            if level < 3:
                shapes[f"{p}input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight"] = (ch, 768)
            n += 1
        if level < 3:
            shapes[f"{p}input_blocks.{n}.0.op.weight"] = (ch, ch, 3, 3)
            n += 1
    shapes[p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"] = (1280, 768)
    cfg = convert.unet_config("full.safetensors", shapes, shapes.__getitem__)
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["layers_per_block"] == 2
    assert cfg["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert cfg["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert cfg["transformer_layers_per_block"] == (1, 1, 1, 1)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_a_lora_chosen_as_checkpoint_is_named_as_a_lora(mini_loras: Path) -> None:
    with pytest.raises(CheckpointError, match="'mini_lora_a.safetensors' .*is a LoRA.*models/loras"):
        load_checkpoint(mini_loras / "mini_lora_a.safetensors")


def test_a_vae_chosen_as_checkpoint_is_named_as_a_vae(tmp_path: Path) -> None:
    path = _write(tmp_path / "vae.safetensors", {"encoder.down.0.block.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'vae.safetensors' .*is a VAE.*VAE"):
        load_checkpoint(path)


def test_a_text_file_renamed_safetensors_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my prompts, not a model\n")
    with pytest.raises(CheckpointError, match="'notes.safetensors' is not a readable .safetensors file"):
        load_checkpoint(path)


def test_a_truncated_safetensors_is_refused_with_its_name(tmp_path: Path, mini_checkpoint: Path) -> None:
    path = tmp_path / "cut.safetensors"
    with open(mini_checkpoint, "rb") as src:
        path.write_bytes(src.read(4_000_000))
    with pytest.raises(CheckpointError, match="'cut.safetensors'.*(truncated|download)"):
        load_checkpoint(path)


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothere.safetensors"):
        load_checkpoint(tmp_path / "nothere.safetensors")


class Sneaky:
    """A pickled object whose loading would need code: it must never be unpickled."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this ran",))


def test_a_pickle_that_needs_code_is_refused_not_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Sneaky()}, f)
    with pytest.raises(CheckpointError, match="'evil.ckpt'.*refuses"):
        load_checkpoint(path)
    assert "this ran" not in capsys.readouterr().out


def test_a_ckpt_state_dict_sub_dict_is_used(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a.weight": torch.ones(2)}, "global_step": 5}, path)
    assert list(load_pickle_weights(path)) == ["a.weight"]


def test_a_checkpoint_with_a_missing_tensor_names_it(tmp_path: Path, mini_checkpoint: Path) -> None:
    with safe_open(str(mini_checkpoint), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "first_stage_model.decoder.conv_out.bias"}
    path = _write(tmp_path / "holed.safetensors", tensors)
    with pytest.raises(CheckpointError, match="'holed.safetensors'.*VAE.*decoder.conv_out.bias"):
        load_checkpoint(path)


def test_a_standalone_ldm_vae_file_loads_the_same_weights(
    tmp_path: Path, mini_checkpoint: Path, loaded_mini: LoadedCheckpoint
) -> None:
    prefix = "first_stage_model."
    with safe_open(str(mini_checkpoint), framework="pt") as f:
        tensors = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    vae = load_vae_file(_write(tmp_path / "my_vae.safetensors", tensors))
    for (name, got), (_, want) in zip(
        vae.state_dict().items(), loaded_mini.vae.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name


def test_a_diffusers_folder_loads_the_same_weights(tmp_path: Path, loaded_mini: LoadedCheckpoint) -> None:
    folder = tmp_path / "mini_diffusers"
    loaded_mini.unet.save_pretrained(folder / "unet")
    loaded_mini.vae.save_pretrained(folder / "vae")
    loaded_mini.text_encoder.save_pretrained(folder / "text_encoder")
    again = load_checkpoint(folder)
    for a, b in ((again.unet, loaded_mini.unet), (again.text_encoder, loaded_mini.text_encoder)):
        for (name, got), want in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(got, want), name


def test_a_folder_without_configs_is_not_a_diffusers_folder(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="unet/config.json is missing"):
        load_checkpoint(tmp_path)


def test_ldm_names_are_found_from_the_modules_alone(loaded_mini: LoadedCheckpoint) -> None:
    from nodes.sd.checkpoint import ldm_names

    te = ldm_names(loaded_mini.text_encoder)
    assert te is not None and te["cond_stage_model.transformer.text_model.final_layer_norm.weight"] == (
        "final_layer_norm.weight"
    )
    unet = ldm_names(loaded_mini.unet)
    assert unet is not None and unet["model.diffusion_model.input_blocks.0.0.weight"] == "conv_in.weight"
    vae = ldm_names(loaded_mini.vae)
    assert vae is not None and len(unet) + len(vae) + len(te) == len(loaded_mini.ldm_keys)
    assert ldm_names(torch.nn.Linear(1, 1)) is None


def test_layout_errors_name_the_file_and_what_it_lacks() -> None:
    from nodes.sd.controlnet import ControlNetError

    lacks = r"^'m.safetensors' lacks 'vae.x' that every SDXL checkpoint has; it is incomplete$"
    with pytest.raises(CheckpointError, match=lacks):
        with layout_errors("m.safetensors", "SDXL checkpoint"):
            raise KeyError("vae.x")
    with pytest.raises(CheckpointError, match=r"^'m.safetensors' is an SD2.x checkpoint$"):
        with layout_errors("m.safetensors", "SD1.x checkpoint"):
            raise convert.UnsupportedCheckpointError("'m.safetensors' is an SD2.x checkpoint")
    with pytest.raises(ControlNetError, match="that every ControlNet has; it is incomplete"):
        with layout_errors("c.safetensors", "ControlNet", ControlNetError):
            raise KeyError("zero_convs.0.0.weight")
