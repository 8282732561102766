"""The graphs A1111 requests become (txt2img, img2img, inpainting, hires fix with each upscaler kind, a
VAE file) validate against the real node declarations, and bad or unsupported fields are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.registry import Registry
from nodegraph.server.a1111 import A1111Error, Inpaint, Job, hires_size
from nodegraph.server.a1111_inputs import refuse_unsupported, save_mask
from nodegraph.validate import validate_prompt
from nodes import all_nodes


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Environment:
    base = tmp_path_factory.mktemp("a1111_graphs")
    for folder, name in (("checkpoints", "mini.safetensors"), ("vae", "v.safetensors"),
                         ("upscale_models", "x2.safetensors")):  # fmt: skip
        (base / "models" / folder).mkdir(parents=True)
        (base / "models" / folder / name).write_bytes(b"")  # validation looks at names only
    (base / "input").mkdir()
    for name in ("init.png", "mask.png"):
        Image.new("RGB", (8, 8)).save(base / "input" / name)
    return Environment(Folders.at(base))


def job(**changes: Any) -> Job:
    settings: dict[str, Any] = dict(
        prompt="a chair", negative="", steps=2, cfg=7.0, sampler="euler", scheduler="normal",
        seed=1, width=64, height=64, batch_size=2, checkpoint="mini.safetensors", clip_skip=2,
    )  # fmt: skip
    return Job(**{**settings, **changes})


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({}, {"EmptyLatentImage", "CLIPSetLastLayer"}),
        ({"vae": "v.safetensors"}, {"VAELoader"}),
        ({"init_image": "init.png", "denoise": 0.5}, {"VAEEncode", "RepeatLatentBatch"}),
        ({"init_image": "init.png", "inpaint": Inpaint("mask.png", fill=1)},
         {"SetLatentNoiseMask", "LoadImageMask", "ImageCompositeMasked"}),
        ({"init_image": "init.png", "inpaint": Inpaint("mask.png", fill=0)}, {"VAEEncodeForInpaint"}),
        ({"init_image": "init.png", "inpaint": Inpaint("mask.png", fill=2)},
         {"SamplerCustom", "KarrasScheduler", "SplitSigmas", "LatentCompositeMasked", "SetLatentNoiseMask"}),
        ({"init_image": "init.png", "inpaint": Inpaint("mask.png", fill=3)},
         {"EmptyLatentImage", "LatentCompositeMasked", "SetLatentNoiseMask"}),
        ({"init_image": "init.png",
          "inpaint": Inpaint("mask.png", 1, region=(2, 2, 4, 4), overlay_mask="mask.png")},
         {"ImageCrop", "RepeatImageBatch", "ImageCompositeMasked"}),
        ({"hires": hires_size({"hr_upscaler": "Latent (bicubic)"}, 64, 64, {})}, {"LatentUpscale"}),
        ({"hires": hires_size({"hr_upscaler": "Nearest", "hr_scale": 1.5}, 64, 64, {})}, {"ImageScale"}),
        ({"hires": hires_size({"hr_upscaler": "x2"}, 64, 64, {"x2": "x2.safetensors"}),
          "vae": "v.safetensors"}, {"UpscaleModelLoader", "ImageUpscaleWithModel", "VAELoader"}),
    ],
)  # fmt: skip
def test_every_request_kind_is_a_valid_graph(
    env: Environment, changes: dict[str, Any], expect: set[str]
) -> None:
    graph = job(**changes).graph()
    result = validate_prompt(graph, Registry(all_nodes()), env)
    assert result.ok, (result.error, result.node_errors)
    assert expect <= {node["class_type"] for node in graph.values()}


def test_hires_upscalers_are_named_when_missing() -> None:
    assert hires_size({"hr_upscaler": "Lanczos", "hr_resize_x": 100}, 64, 32, {}) == {
        "image": "lanczos", "size": {"width": 96, "height": 48}}  # fmt: skip
    with pytest.raises(A1111Error, match="hr_upscaler: 'R-ESRGAN 4x\\+' is not available.*Lanczos"):
        hires_size({"hr_upscaler": "R-ESRGAN 4x+"}, 64, 64, {})


@pytest.mark.parametrize(
    ("field", "value"),
    [("restore_faces", True), ("tiling", True), ("styles", ["Cinematic"]), ("script_name", "x/y/z plot"),
     ("alwayson_scripts", {"controlnet": {"args": []}}), ("subseed_strength", 0.3), ("hr_prompt", "other")],
)  # fmt: skip
def test_unsupported_fields_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(A1111Error, match=f"^{field}: "):
        refuse_unsupported({"prompt": "a", field: value})
    refuse_unsupported(
        {"prompt": "a", "hr_prompt": "a", "styles": [], "alwayson_scripts": {}, "tiling": False}
    )


def test_the_mask_is_prepared_as_a1111_does(tmp_path: Path) -> None:
    import base64
    import io

    import numpy as np

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    raw = base64.b64encode(buffer.getvalue()).decode()
    body = {"mask": raw, "mask_blur": 0, "inpaint_full_res": False, "inpainting_mask_invert": 1}
    spec = save_mask(tmp_path, body, 64, 64, (32, 32))
    prepared = np.asarray(Image.open(tmp_path / spec.mask_image))[..., 0]
    assert prepared.shape == (64, 64) and spec.fill == 0 and spec.region is None
    assert prepared[0, 0] == 255 and prepared[32, 32] == 0  # inverted: the outside is repainted
    for field, bad in (
        ("inpainting_fill", 4),
        ("inpainting_fill", True),
        ("mask_blur", "x"),
        ("mask", "!!"),
        ("inpaint_full_res_padding", -1),
    ):
        with pytest.raises(A1111Error, match=f"^{field}: "):
            save_mask(tmp_path, {**body, field: bad}, 64, 64, (32, 32))


def png_b64(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def boxed(box: tuple[int, int, int, int]) -> str:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, box)
    return png_b64(mask)


def test_only_masked_cuts_the_masked_box_widened_to_the_output_ratio(tmp_path: Path) -> None:
    """A1111's default `inpaint_full_res`: the 16x16 box plus 4 px padding (24x24), widened to the
    2:1 output (48x24, centred), cut from the 64x64 init; near an edge the box shifts inside."""
    body = {"mask": boxed((20, 30, 36, 46)), "mask_blur": 0, "inpaint_full_res_padding": 4}
    spec = save_mask(tmp_path, body, 128, 64, (64, 64))
    assert spec.region == (4, 26, 48, 24)
    assert spec.overlay_mask is not None and Image.open(tmp_path / spec.overlay_mask).size == (48, 24)
    assert Image.open(tmp_path / spec.mask_image).size == (128, 64)
    tall = save_mask(tmp_path, {**body, "inpaint_full_res_padding": 0}, 64, 128, (64, 64))
    assert tall.region == (20, 22, 16, 32)  # 16x16 grown to 1:2, centred
    low = {**body, "mask": boxed((20, 52, 36, 64)), "inpaint_full_res_padding": 0}
    edge = save_mask(tmp_path, low, 64, 128, (64, 64))
    assert edge.region == (20, 32, 16, 32)  # 16x12 grown to 16x32, moved up to end at the bottom edge
    with pytest.raises(A1111Error, match="^mask: the mask is empty"):
        save_mask(tmp_path, {**body, "mask": png_b64(Image.new("L", (64, 64), 0))}, 64, 64, (64, 64))


@pytest.mark.parametrize("fill", [2, 3])
def test_latent_noise_and_nothing_replace_the_masked_latent_of_each_image(fill: int) -> None:
    """A1111's fills 2 and 3 (modules/processing.py: `init_latent * mask + noise * nmask`, or
    `init_latent * mask`): the encoded batch gets, under the mask, the seed's noise (the KSampler's own
    draw: same seed, same batch shape) or zeros; then the mask keeps the rest while sampling."""
    graph = job(init_image="init.png", denoise=0.6, inpaint=Inpaint("mask.png", fill=fill)).graph()
    sampler = graph["3"]["inputs"]
    noise_mask = graph[sampler["latent_image"][0]]
    assert noise_mask["class_type"] == "SetLatentNoiseMask" and noise_mask["inputs"]["mask"] == ["22", 0]
    composite = graph[noise_mask["inputs"]["samples"][0]]
    assert composite["class_type"] == "LatentCompositeMasked" and composite["inputs"]["mask"] == ["22", 0]
    batch = graph[composite["inputs"]["destination"][0]]  # the encoded image, made a batch first
    assert batch["class_type"] == "RepeatLatentBatch"
    assert graph[batch["inputs"]["samples"][0]]["class_type"] == "VAEEncode"
    source = graph[composite["inputs"]["source"][0]]
    if fill == 3:
        zeros = {"width": 64, "height": 64, "batch_size": 2}
        assert source == {"class_type": "EmptyLatentImage", "inputs": zeros}
        return
    noise = source["inputs"]
    assert source["class_type"] == "SamplerCustom" and noise["add_noise"] is True
    assert noise["noise_seed"] == sampler["seed"]
    assert graph[noise["latent_image"][0]]["inputs"]["batch_size"] == 2
    split = graph[noise["sigmas"][0]]
    assert split["class_type"] == "SplitSigmas" and split["inputs"]["step"] == 0
    one_sigma = {"steps": 1, "sigma_max": 1.0, "sigma_min": 1.0, "rho": 7.0}
    assert graph[split["inputs"]["sigmas"][0]]["inputs"] == one_sigma
