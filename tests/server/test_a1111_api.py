"""AUTOMATIC1111's API on the real SD nodes: the image equals the equivalent ComfyUI graph's image.

Uses the mini SD1.5 checkpoint and LoRAs at 64x64 and 2 steps; `webuiapi` from PyPI is used unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webuiapi
from PIL import Image
from safetensors.torch import save_file

import nodes
from nodegraph.engine import Settings, build_engine
from nodegraph.server.a1111 import parse_infotext, sampler_and_scheduler
from tests.nodes.test_upscale_model import basicsr_state
from tests.server.live import LiveServer, http_json, wait_history

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_loras: Path
) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("a1111")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "loras").mkdir(parents=True)
    os.symlink(mini_checkpoint, base / "models" / "checkpoints" / "mini.safetensors")
    os.symlink(mini_loras / "mini_lora_a.safetensors", base / "models" / "loras" / "mini_lora_a.safetensors")
    (base / "models" / "upscale_models").mkdir()
    save_file(basicsr_state(2), str(base / "models" / "upscale_models" / "tiny_x2.safetensors"))
    engine = build_engine(
        Settings(base_directory=base, port=0),
        nodes.all_nodes(),
        services=nodes.register_services,
        warm_up=nodes.warm_up,
    )
    engine.warm_up()  # torch's first import, before the live server's 30 s start limit
    with LiveServer(engine) as live:
        yield live


def comfy_graph(seed: int, prompt: str, lora: tuple[float, float] | None) -> dict[str, Any]:
    """What a ComfyUI user builds for the same settings: LoraLoader instead of the prompt tag."""
    model, clip = ["4", 0], ["4", 1]
    loader = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini.safetensors"}}
    graph: dict[str, Any] = {"4": loader}
    if lora is not None:
        graph["10"] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": "mini_lora_a.safetensors",
            "strength_model": lora[1], "strength_clip": lora[0]}}  # fmt: skip
        model, clip = ["10", 0], ["10", 1]
    graph.update({
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 2, "cfg": 6.5, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "denoise": 1.0, "model": model, "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "comfy", "images": ["8", 0]}},
    })  # fmt: skip
    return graph


def comfy_pixels(server: LiveServer, graph: dict[str, Any]) -> np.ndarray:
    pid = http_json(server.address, "/prompt", {"prompt": graph})["prompt_id"]
    image = wait_history(server.address, pid, timeout=300)["outputs"]["9"]["images"][0]
    path = server.engine.env.folders.output_dir / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGB"))


def test_names_map_as_a1111_spells_them() -> None:
    assert sampler_and_scheduler("DPM++ 2M Karras", None) == ("dpmpp_2m", "karras")
    assert sampler_and_scheduler("Euler a", "Automatic") == ("euler_ancestral", "normal")
    assert sampler_and_scheduler("DDIM", None) == ("ddim", "ddim_uniform")
    assert sampler_and_scheduler("DPM++ 2M", "sgm_uniform") == ("dpmpp_2m", "sgm_uniform")
    with pytest.raises(ValueError, match="sampler_name"):
        sampler_and_scheduler("PLMS", None)


def test_txt2img_with_lora_tags_equals_the_comfyui_graph(server: LiveServer) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    prompt = "a red chair <lora:mini_lora_a:0.8:0.6>"
    result = api.txt2img(
        prompt=prompt, negative_prompt="blurry", seed=1234, steps=2, cfg_scale=6.5, width=64, height=64,
        sampler_name="DPM++ 2M", scheduler="Karras",
    )  # fmt: skip
    assert len(result.images) == 1
    ours = np.asarray(result.images[0].convert("RGB"))
    theirs = comfy_pixels(server, comfy_graph(1234, "a red chair", (0.8, 0.6)))
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(ours, comfy_pixels(server, comfy_graph(1234, "a red chair", None)))
    # A1111's infotext, with the LoRA's short hash, in the response and in the PNG.
    lora_file = server.engine.env.folders.resolve("loras", "mini_lora_a.safetensors")
    lora_hash = hashlib.sha256(lora_file.read_bytes())
    fields = parse_infotext(result.info["infotexts"][0])
    assert fields["Prompt"] == prompt and fields["Negative prompt"] == "blurry"
    assert fields["Steps"] == "2" and fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Karras"
    assert fields["Seed"] == "1234" and fields["Size-1"] == "64"
    assert fields["Lora hashes"] == f"mini_lora_a: {lora_hash.hexdigest()[:12]}"
    raw = base64.b64decode(result.json["images"][0])
    assert Image.open(io.BytesIO(raw)).info["parameters"] == result.info["infotexts"][0]
    assert api.png_info(result.images[0]).info == result.info["infotexts"][0]


def test_img2img_options_models_loras_and_interrupt(server: LiveServer) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert [m["title"] for m in api.get_sd_models()][0].startswith("mini.safetensors")
    assert [lora["name"] for lora in api.get_loras()] == ["mini_lora_a"]
    assert "DPM++ 2M" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    api.set_options({"sd_model_checkpoint": "mini", "CLIP_stop_at_last_layers": 2})
    options = api.get_options()
    # A1111's option holds the model's title, as sd-models lists it ("name [short hash]" once hashed).
    assert options["sd_model_checkpoint"] == api.get_sd_models()[0]["title"]
    assert (
        options["sd_model_checkpoint"].startswith("mini.safetensors")
        and options["CLIP_stop_at_last_layers"] == 2
    )
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    result = api.img2img(images=[init], prompt="a red chair", seed=7, steps=2, width=64, height=64,
                         denoising_strength=0.5, sampler_name="Euler")  # fmt: skip
    assert result.images[0].size == (64, 64)
    fields = parse_infotext(result.info["infotexts"][0])
    assert fields["Denoising strength"] == "0.5" and fields["Clip skip"] == "2"
    api.set_options({"CLIP_stop_at_last_layers": 1})
    bad = api.session.post(f"{api.baseurl}/txt2img", json={"sampler_name": "PLMS", "steps": 2})
    assert bad.status_code == 422 and "sampler_name" in bad.json()["detail"]
    api.interrupt()  # nothing running: a no-op, as in A1111
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0


def test_openai_image_generation_on_the_same_mapping(server: LiveServer) -> None:
    import requests

    url = f"http://{server.address}/v1/images/generations"
    reply = requests.post(url, json={"prompt": "a red chair", "size": "64x64", "model": "mini"}, timeout=600)
    assert reply.status_code == 200, reply.text
    image = Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
    assert image.size == (64, 64) and "Steps: 20" in image.info["parameters"]
    refused = requests.post(url, json={"prompt": "x", "response_format": "url"}, timeout=60)
    assert refused.status_code == 400 and "b64_json" in refused.json()["error"]["message"]


def test_img2img_inpainting_repaints_only_the_masked_area(server: LiveServer) -> None:
    """`mask` -> LoadImageMask + SetLatentNoiseMask (inpainting_fill 1, "original"), the result pasted over
    the init image through the mask as A1111 does: far from the mask the init pixels come back."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    rng = np.random.default_rng(3)
    init_pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    init = Image.fromarray(init_pixels)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    result = api.img2img(
        images=[init], mask_image=mask, mask_blur=2, inpainting_fill=1, inpaint_full_res=False,
        prompt="a chair", seed=7, steps=2, width=64, height=64, denoising_strength=0.9, sampler_name="Euler",
    )  # fmt: skip
    out = np.asarray(result.image.convert("RGB")).astype(int)
    far = np.ones((64, 64), bool)
    far[14:50, 14:50] = False  # the box, its blur and a margin
    assert np.abs(out[far] - init_pixels[far].astype(int)).max() <= 1
    assert np.abs(out[28:36, 28:36] - init_pixels[28:36, 28:36].astype(int)).mean() > 10
    fields = parse_infotext(result.info["infotexts"][0])
    assert fields["Mask blur"] == "2" and fields["Denoising strength"] == "0.9"
    # A1111's "latent noise" (2) and "latent nothing" (3): the masked area starts from the seed's noise or
    # from zeros instead of the init image, the rest is kept as with "original" (1). At a low denoising
    # strength, where the start matters, the three differ inside the mask.
    repainted = {}
    for fill in (1, 2, 3):
        other = api.img2img(
            images=[init], mask_image=mask, mask_blur=2, inpainting_fill=fill, inpaint_full_res=False,
            prompt="a chair", seed=7, steps=2, width=64, height=64, denoising_strength=0.3,
            sampler_name="Euler",
        )  # fmt: skip
        repainted[fill] = np.asarray(other.image.convert("RGB")).astype(int)[28:36, 28:36]
        assert np.abs(np.asarray(other.image.convert("RGB"))[far] - init_pixels[far].astype(int)).max() <= 1
        content = {1: None, 2: "latent noise", 3: "latent nothing"}[fill]
        assert parse_infotext(other.info["infotexts"][0]).get("Masked content") == content
    for a, b in ((1, 2), (1, 3), (2, 3)):
        assert np.abs(repainted[a] - repainted[b]).mean() > 5, (a, b)
    # A fill A1111 does not have is refused by name, not a 500.
    body = {"init_images": [result.json["images"][0]], "mask": result.json["images"][0], "steps": 1}
    reply = api.session.post(f"{api.baseurl}/img2img", json={**body, "inpainting_fill": 4})
    assert reply.status_code == 422 and reply.json()["detail"].startswith("inpainting_fill")


def test_inpainting_only_masked_with_webuiapi_defaults(server: LiveServer) -> None:
    """A1111's default "Only masked" (webuiapi's too): the box around the mask is cut out, repainted at
    the requested 64x64 and pasted back into the 96x64 init; a batch of two keeps both images."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    init_pixels = np.random.default_rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (40, 24, 56, 40))
    result = api.img2img(
        images=[Image.fromarray(init_pixels)], mask_image=mask, prompt="a chair", seed=3, steps=2,
        width=64, height=64, batch_size=2, denoising_strength=0.9, sampler_name="Euler",
    )  # fmt: skip
    assert [image.size for image in result.images] == [(96, 64), (96, 64)]
    far = np.ones((64, 96), bool)
    far[:, 26:70] = False  # the 16x16 box grown to the 1:1 output (16 + 2 x blur 4 -> 24 wide) and a margin
    for image in result.images:
        out = np.asarray(image.convert("RGB")).astype(int)
        assert np.abs(out[far] - init_pixels[far].astype(int)).max() <= 1
        assert np.abs(out[28:36, 44:52] - init_pixels[28:36, 44:52].astype(int)).mean() > 10


def test_extras_upscale_with_a_model_is_the_comfyui_graph(server: LiveServer) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest", "tiny_x2"]
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    result = api.extra_single_image(picture, upscaler_1="tiny_x2", upscaling_resize=3)
    assert result.image.size == (48, 36)
    picture.save(Path(server.engine.env.folders.input_dir) / "extras_src.png")
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "extras_src.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny_x2.safetensors"}},
        "3": {"class_type": "ImageUpscaleWithModel",
              "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "ImageScale", "inputs": {"image": ["3", 0], "upscale_method": "lanczos",
              "width": 48, "height": 36, "crop": "disabled"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "extras"}},
    }  # fmt: skip
    assert np.array_equal(np.asarray(result.image.convert("RGB")), comfy_pixels(server, graph))
    exact = api.extra_single_image(picture, resize_mode=1, upscaling_resize_w=40, upscaling_resize_h=24)
    assert exact.image.size == (40, 24)
    for extra, field in (
        ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
        ({"gfpgan_visibility": 0.5}, "gfpgan"),
    ):
        body = {"image": result.json["image"], **extra}
        reply = api.session.post(f"{api.baseurl}/extra-single-image", json=body)
        assert reply.status_code == 422 and reply.json()["detail"].startswith(field)


def test_extras_batch_upscales_each_image_in_order(server: LiveServer) -> None:
    """`extra-batch-images` (webuiapi's `extra_batch_images`, unchanged): each image of `imageList` goes
    through the single-image graph; the answer lists them in the order sent."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    rng = np.random.default_rng(6)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, 10, 3), dtype=np.uint8)) for h in (6, 8)]
    batch = api.extra_batch_images(pictures, upscaler_1="tiny_x2", upscaling_resize=2)
    assert [image.size for image in batch.images] == [(20, 12), (20, 16)]
    for picture, image in zip(pictures, batch.images, strict=True):
        single = api.extra_single_image(picture, upscaler_1="tiny_x2", upscaling_resize=2).image
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(single.convert("RGB")))
    good = batch.json["images"][0]
    body = {"imageList": [{"data": good, "name": "a"}, {"data": "!!", "name": "b"}]}
    reply = api.session.post(f"{api.baseurl}/extra-batch-images", json=body)
    assert reply.status_code == 422 and reply.json()["detail"].startswith("imageList[1] ('b')")
    reply = api.session.post(f"{api.baseurl}/extra-batch-images", json={"imageList": []})
    assert reply.status_code == 422 and reply.json()["detail"].startswith("imageList")


def test_hires_fix_with_an_upscale_model_and_kept_overrides(server: LiveServer) -> None:
    """hr_upscaler naming an upscale_models file: decode, ImageUpscaleWithModel, scale, encode, second
    pass; `override_settings_restore_afterwards: false` keeps the overrides as options, as in A1111."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    result = api.txt2img(
        prompt="a chair", seed=5, steps=1, width=64, height=64, sampler_name="Euler", enable_hr=True,
        hr_upscaler="tiny_x2", hr_scale=1.5, denoising_strength=0.5,
        override_settings={"CLIP_stop_at_last_layers": 2}, override_settings_restore_afterwards=False,
    )  # fmt: skip
    assert result.image.size == (96, 96)
    assert parse_infotext(result.info["infotexts"][0])["Hires upscaler"] == "tiny_x2"
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})
