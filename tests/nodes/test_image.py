"""VAEDecode/VAEEncode nodes, SaveImage/PreviewImage files and metadata, LoadImage images and masks."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.env import Environment
from nodegraph.folders import PathEscapeError
from nodegraph.testing import RecordingContext
from nodes.image import (
    ImageFileError,
    LoadImage,
    PreviewImage,
    SaveImage,
    VAEDecode,
    VAEEncode,
    to_uint8,
)
from nodes.loaders import CheckpointLoaderSimple
from tests.conftest import ORACLE

REFS = ORACLE / "refs"


def test_vae_nodes_decode_like_comfyui_and_encode_to_a_latent(models_env: Environment) -> None:
    ctx = RecordingContext(models_env)
    vae = CheckpointLoaderSimple().run(ctx, "mini.safetensors")[2]
    latent = torch.from_numpy(np.load(REFS / "baseline" / "latent.npy"))
    (image,) = VAEDecode().run(ctx, {"samples": latent}, vae)
    assert float(np.abs(image.numpy() - np.load(REFS / "baseline" / "image_float.npy")).max()) <= 3e-5
    (encoded,) = VAEEncode().run(ctx, image, vae)
    assert set(encoded) == {"samples"} and encoded["samples"].shape == (1, 4, 8, 8)
    info = VAEDecode.info(models_env)
    assert info["input_order"]["required"] == ["samples", "vae"] and info["category"] == "latent"


def test_uint8_conversion_truncates_like_comfyui() -> None:
    floats = torch.from_numpy(np.load(REFS / "baseline" / "image_float.npy"))[0]
    expected = np.array(Image.open(REFS / "baseline" / "image.png"))
    assert np.array_equal(to_uint8(floats), expected)
    assert to_uint8(torch.tensor([0.999, 1.5, -0.2])).tolist() == [254, 255, 0]


def _image(h: int = 16, w: int = 24, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, h, w, 3, generator=torch.Generator().manual_seed(0))


def test_save_image_names_counts_and_writes_metadata(env: Environment, ctx: RecordingContext) -> None:
    prompt = {"1": {"class_type": "SaveImage", "inputs": {}}}
    extra = {"workflow": {"nodes": []}, "other": "é"}
    result = SaveImage().run(ctx, _image(batch=2), "run/cat_%width%x%height%", prompt, extra)
    names = [i["filename"] for i in result.ui["images"]]  # type: ignore[index]
    assert names == ["cat_24x16_00001_.png", "cat_24x16_00002_.png"]
    assert result.ui["images"][0]["subfolder"] == "run" and result.ui["images"][0]["type"] == "output"  # type: ignore[index]
    saved = Image.open(env.folders.output_dir / "run" / names[0])
    assert saved.text == {"prompt": json.dumps(prompt), "workflow": '{"nodes": []}', "other": '"\\u00e9"'}
    again = SaveImage().run(ctx, _image(), "run/cat_%width%x%height%")
    assert again.ui["images"][0]["filename"] == "cat_24x16_00003_.png"  # type: ignore[index]


def test_two_writers_saving_one_prefix_at_once_never_overwrite_each_other(
    env: Environment, ctx: RecordingContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Ray workers on one machine both compute the same next counter; each file must survive."""
    import nodes.image as image_module

    # both writers scanned the folder before either wrote: the same counter for both
    monkeypatch.setattr(image_module, "_next_counter", lambda folder, stem: 1)
    first = SaveImage().run(ctx, _image(), "race")
    second = SaveImage().run(ctx, torch.ones(1, 16, 24, 3), "race")
    names = [r.ui["images"][0]["filename"] for r in (first, second)]  # type: ignore[index]
    assert names == ["race_00001_.png", "race_00002_.png"]
    pixels = [np.asarray(Image.open(env.folders.output_dir / n)) for n in names]
    assert not np.array_equal(pixels[0], pixels[1]) and pixels[1].min() == 255
    assert sorted(p.name for p in env.folders.output_dir.iterdir()) == names  # no .partial left behind
    assert all((env.folders.output_dir / n).stat().st_mode & 0o044 == 0o044 for n in names)  # not 0600


def test_save_image_without_metadata_when_disabled(env: Environment, ctx: RecordingContext) -> None:
    env.disable_metadata = True
    SaveImage().run(ctx, _image(), "plain", {"a": 1}, {"workflow": {}})
    assert Image.open(env.folders.output_dir / "plain_00001_.png").text == {}


@pytest.mark.parametrize("prefix", ["../escape", "/etc/x", "a/../../b"])
def test_save_image_refuses_to_leave_the_output_folder(ctx: RecordingContext, prefix: str) -> None:
    with pytest.raises(PathEscapeError, match="outside the output folder"):
        SaveImage().run(ctx, _image(), prefix)


def test_preview_image_goes_to_temp_with_a_random_suffix(env: Environment, ctx: RecordingContext) -> None:
    result = PreviewImage().run(ctx, _image())
    entry = result.ui["images"][0]  # type: ignore[index]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    assert (env.folders.temp_dir / entry["filename"]).is_file()


def test_load_image_rgba_gives_inverted_alpha_mask(env: Environment, ctx: RecordingContext) -> None:
    rgba = np.zeros((5, 7, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 51
    Image.fromarray(rgba, "RGBA").save(env.folders.input_dir / "a.png")
    image, mask = LoadImage().run(ctx, "a.png")
    assert image.shape == (1, 5, 7, 3) and mask.shape == (1, 5, 7)
    assert torch.allclose(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(mask, torch.full((1, 5, 7), 1 - 0.2))


def test_load_image_rgb_has_a_64x64_zero_mask_and_is_exif_transposed(
    env: Environment, ctx: RecordingContext
) -> None:
    img = Image.new("RGB", (4, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the loaded image is 2 wide, 4 high
    img.save(env.folders.input_dir / "r.jpg", exif=exif.tobytes())
    image, mask = LoadImage().run(ctx, "r.jpg")
    assert image.shape == (1, 4, 2, 3)
    assert mask.shape == (1, 64, 64) and not mask.any()


def test_load_image_reads_every_frame_of_an_animation(env: Environment, ctx: RecordingContext) -> None:
    frames = [Image.new("RGB", (6, 6), (c, 0, 0)) for c in (0, 128, 255)]
    frames[0].save(env.folders.input_dir / "anim.gif", save_all=True, append_images=frames[1:])
    image, mask = LoadImage().run(ctx, "anim.gif")
    assert image.shape == (3, 6, 6, 3) and mask.shape[0] == 3


def test_load_image_that_is_not_an_image_names_the_file(env: Environment, ctx: RecordingContext) -> None:
    (env.folders.input_dir / "notes.png").write_text("hello")
    with pytest.raises(ImageFileError, match="'notes.png' is not an image"):
        LoadImage().run(ctx, "notes.png")


def test_load_image_list_validation_and_fingerprint(env: Environment) -> None:
    Image.new("RGB", (2, 2)).save(env.folders.input_dir / "b.png")
    Image.new("RGB", (2, 2)).save(env.folders.output_dir / "out.png")
    (env.folders.input_dir / "readme.txt").write_text("x")
    info = LoadImage.info(env)["input"]["required"]["image"]
    assert info == [["b.png"], {"image_upload": True}]
    assert LoadImage.input("image").check(env, "b.png") is None
    assert LoadImage.input("image").check(env, "out.png [output]") is None
    assert LoadImage.input("image").check(env, "nope.png") == "Invalid image file: nope.png"
    assert LoadImage.input("image").check(env, "../x.png") == "Invalid image file: ../x.png"
    digest = hashlib.sha256((env.folders.input_dir / "b.png").read_bytes()).hexdigest()
    assert LoadImage.input("image").fingerprint(env, "b.png") == digest
