"""SD1.x inpainting checkpoints (9-channel UNet) and InpaintModelConditioning, as ComfyUI runs them.

The 9-channel checkpoint is the mini checkpoint with conv_in widened (seeded random weights). The
UNet's conv_in input is hooked and its extra channels compared with ComfyUI's concat_cond written
out independently here: mask (rounded, bilinear to latent size) + masked-image latent (x 0.18215),
or ones + blank_inpaint_image_like when no mask is anywhere.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nodegraph.engine import Settings, build_engine
from nodegraph.events import Event
from nodegraph.testing import RecordingContext
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.conditioning import CLIPTextEncode
from nodes.conditioning_area import ConditioningSetArea
from nodes.image import VAEEncode
from nodes.inpaint import InpaintModelConditioning, VAEEncodeForInpaint
from nodes.latent import EmptyLatentImage
from nodes.loaders import CheckpointLoaderSimple
from nodes.sampling import KSampler
from nodes.sd import vae as vae_math
from tests.conftest import ORACLE

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
BLANK = torch.tensor([0.8223, -0.6876, 0.6364, 0.1380]).reshape(1, 4, 1, 1)
SCALE = 0.18215


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path) -> Any:
    base = tmp_path_factory.mktemp("inpaint_model")
    folder = base / "models" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "mini.safetensors").symlink_to(mini_checkpoint)
    tensors = load_file(str(mini_checkpoint))
    conv_in = tensors[CONV_IN]
    generator = torch.Generator().manual_seed(9)
    extra = torch.randn((conv_in.shape[0], 5, *conv_in.shape[2:]), generator=generator) * 0.1
    tensors[CONV_IN] = torch.cat([conv_in, extra.to(conv_in.dtype)], dim=1).contiguous()
    save_file(tensors, str(folder / "mini_inpaint.safetensors"))
    (base / "input").mkdir()
    shutil.copy(ORACLE / "workflows" / "init_64.png", base / "input" / "init_64.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:40] = 255
    Image.fromarray(np.stack([mask, mask, mask], axis=-1), "RGB").save(base / "input" / "mask_64.png")
    return build_engine(Settings(base_directory=base, preview_method="none"), all_nodes())


@pytest.fixture
def ctx(engine: Any) -> RecordingContext:
    return RecordingContext(engine.env)


def load(ctx: RecordingContext, name: str) -> tuple[Any, Any, Any]:
    model, clip, vae = CheckpointLoaderSimple().run(ctx, name)
    return model, clip, vae


@pytest.fixture
def conv_inputs(ctx: RecordingContext) -> Iterator[tuple[Any, list[torch.Tensor]]]:
    """The inpainting model's handles and a list that collects every conv_in input."""
    model, clip, vae = load(ctx, "mini_inpaint.safetensors")
    seen: list[torch.Tensor] = []
    hook = model.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().cpu()))
    yield (model, clip, vae), seen
    hook.remove()


def prompts(ctx: RecordingContext, clip: Any) -> tuple[Any, Any]:
    return CLIPTextEncode().run(ctx, "a cat", clip)[0], CLIPTextEncode().run(ctx, "", clip)[0]


def sample(
    ctx: RecordingContext, model: Any, positive: Any, negative: Any, latent: Any, cfg: float = 7.0
) -> Any:
    return KSampler().run(ctx, model, 5, 1, cfg, "euler", "normal", positive, negative, latent, 1.0)[0]


def pixels_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros((1, 64, 64))
    mask[0, 10:40, 24:60] = 1.0
    return pixels, mask


def mask_at_latent(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI: reshape to [B,1,H,W], bilinear (no crop needed: same aspect) to 8x8, round."""
    small = torch.nn.functional.interpolate(
        mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=(8, 8), mode="bilinear"
    )
    return small.round()


def test_inpainting_checkpoint_loads_as_sd15_with_nine_input_channels(ctx: RecordingContext) -> None:
    model, _, _ = load(ctx, "mini_inpaint.safetensors")
    assert model.family == "sd15" and model.unet.config.in_channels == 9
    assert model.unet.conv_in.weight.shape[1] == 9
    plain, _, _ = load(ctx, "mini.safetensors")
    assert plain.unet.config.in_channels == 4


def test_inpaint_model_conditioning_conds_reach_the_unet(ctx: RecordingContext, conv_inputs: Any) -> None:
    (model, clip, vae), seen = conv_inputs
    positive, negative = prompts(ctx, clip)
    pixels, mask = pixels_and_mask()
    pos, neg, latent = InpaintModelConditioning().run(ctx, positive, negative, vae, pixels, mask, True)
    out = sample(ctx, model, pos, neg, latent)
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    (x,) = seen
    assert x.shape == (2, 9, 8, 8)  # uncond and cond in one batch
    expected = torch.cat([mask_at_latent(mask), pos[0][1]["concat_latent_image"] * SCALE], dim=1)
    for item in x:
        torch.testing.assert_close(item[4:].unsqueeze(0), expected, rtol=1e-5, atol=1e-5)


def test_per_entry_concat_differs_between_positive_and_negative(
    ctx: RecordingContext, conv_inputs: Any
) -> None:
    (model, clip, vae), seen = conv_inputs
    positive, negative = prompts(ctx, clip)
    pixels, mask = pixels_and_mask()
    pos, _, latent = InpaintModelConditioning().run(ctx, positive, negative, vae, pixels, mask, False)
    assert "noise_mask" not in latent
    sample(ctx, model, pos, negative, latent)  # the negative has no concat options and no noise mask
    (x,) = seen
    with_mask = torch.cat([mask_at_latent(mask), pos[0][1]["concat_latent_image"] * SCALE], dim=1)[0]
    blank = torch.cat([torch.ones(1, 1, 8, 8), BLANK.expand(1, 4, 8, 8)], dim=1)[0]
    halves = [item[4:] for item in x]
    assert any(torch.allclose(h, with_mask, atol=1e-5) for h in halves)
    assert any(torch.allclose(h, blank, atol=1e-6) for h in halves)


def test_latent_noise_mask_feeds_the_concat(ctx: RecordingContext, conv_inputs: Any) -> None:
    (model, clip, vae), seen = conv_inputs
    positive, negative = prompts(ctx, clip)
    pixels, mask = pixels_and_mask()
    (latent,) = VAEEncodeForInpaint().run(ctx, pixels, vae, mask, 6)
    sample(ctx, model, positive, negative, latent)
    (x,) = seen
    expected = torch.cat([mask_at_latent(latent["noise_mask"]), latent["samples"] * SCALE], dim=1)
    for item in x:
        torch.testing.assert_close(item[4:].unsqueeze(0), expected, rtol=1e-5, atol=1e-5)


def test_no_mask_gives_ones_and_the_blank_latent(ctx: RecordingContext, conv_inputs: Any) -> None:
    (model, clip, _), seen = conv_inputs
    positive, negative = prompts(ctx, clip)
    pixels, _ = pixels_and_mask()
    (latent,) = VAEEncode().run(ctx, pixels, load(ctx, "mini_inpaint.safetensors")[2])
    sample(ctx, model, positive, negative, latent, cfg=1.0)
    (x,) = seen
    assert x.shape == (1, 9, 8, 8)  # cfg 1: the cond pass only
    torch.testing.assert_close(x[:, 4:5], torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(x[:, 5:], BLANK.expand(1, 4, 8, 8))


def test_an_area_entry_gets_its_crop_of_the_concat(ctx: RecordingContext, conv_inputs: Any) -> None:
    (model, clip, vae), seen = conv_inputs
    positive, negative = prompts(ctx, clip)
    pixels, mask = pixels_and_mask()
    pos, neg, latent = InpaintModelConditioning().run(ctx, positive, negative, vae, pixels, mask, True)
    (pos,) = ConditioningSetArea().run(ctx, pos, 32, 32, 16, 8, 1.0)  # latent rows 1..5, columns 2..6
    sample(ctx, model, pos, neg, latent)
    full = torch.cat([mask_at_latent(mask), pos[0][1]["concat_latent_image"] * SCALE], dim=1)
    crops = [x for x in seen if x.shape[-2:] == (4, 4)]
    assert [x.shape for x in crops] == [torch.Size((2, 9, 4, 4))]  # the area entry and its negative twin
    for item in crops[0]:
        torch.testing.assert_close(item[4:].unsqueeze(0), full[:, :, 1:5, 2:6], rtol=1e-5, atol=1e-5)


def test_a_concat_of_another_size_is_centre_cropped_and_resized(
    ctx: RecordingContext, conv_inputs: Any
) -> None:
    (model, clip, vae), seen = conv_inputs
    positive, negative = prompts(ctx, clip)
    pixels = torch.rand((1, 96, 64, 3), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros((1, 96, 64))
    mask[0, 30:70, 8:40] = 1.0
    pos, neg, _ = InpaintModelConditioning().run(ctx, positive, negative, vae, pixels, mask, True)
    (empty,) = EmptyLatentImage().run(ctx, 64, 64, 2)  # 8x8, a batch of two; no noise mask
    sample(ctx, model, pos, neg, empty)
    (x,) = seen
    # common_upscale(..., "bilinear", "center"): 12x8 latent rows 2..10, 96x64 mask rows 16..80
    image = pos[0][1]["concat_latent_image"][:, :, 2:10, :] * SCALE
    small = torch.nn.functional.interpolate(mask[:, None, 16:80, :], size=(8, 8), mode="bilinear").round()
    expected = torch.cat([small, image], dim=1)
    assert x.shape == (4, 9, 8, 8)
    for item in x:
        torch.testing.assert_close(item[4:].unsqueeze(0), expected, rtol=1e-5, atol=1e-5)


def comfy_inpaint_model_conditioning(
    pixels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI nodes.py InpaintModelConditioning.encode's pixel part, as written there."""
    x = (pixels.shape[1] // 8) * 8
    y = (pixels.shape[2] // 8) * 8
    mask = torch.nn.functional.interpolate(
        mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
        size=(pixels.shape[1], pixels.shape[2]),
        mode="bilinear",
    )
    pixels = pixels.clone()
    if pixels.shape[1] != x or pixels.shape[2] != y:
        x_offset = (pixels.shape[1] % 8) // 2
        y_offset = (pixels.shape[2] % 8) // 2
        pixels = pixels[:, x_offset : x + x_offset, y_offset : y + y_offset, :]
        mask = mask[:, :, x_offset : x + x_offset, y_offset : y + y_offset]
    m = (1.0 - mask.round()).squeeze(1)
    for i in range(3):
        pixels[:, :, :, i] -= 0.5
        pixels[:, :, :, i] *= m
        pixels[:, :, :, i] += 0.5
    return pixels, mask


def test_inpaint_model_conditioning_matches_comfyuis_formula(ctx: RecordingContext) -> None:
    _, clip, vae = load(ctx, "mini.safetensors")
    positive, negative = prompts(ctx, clip)
    positive = [[positive[0][0], {**positive[0][1], "strength": 0.5}]]
    generator = torch.Generator().manual_seed(2)
    pixels = torch.rand((1, 21, 19, 3), generator=generator)
    mask = torch.rand((1, 7, 5), generator=generator)
    pos, neg, latent = InpaintModelConditioning().run(ctx, positive, negative, vae, pixels, mask, True)
    masked, big_mask = comfy_inpaint_model_conditioning(pixels, mask)
    assert masked.shape == (1, 16, 16, 3) and big_mask.shape == (1, 1, 16, 16)
    model = vae.vae
    for out in (pos, neg):
        assert torch.equal(out[0][1]["concat_mask"], big_mask)
        torch.testing.assert_close(out[0][1]["concat_latent_image"], vae_math.encode(model, masked))
    assert pos[0][1]["strength"] == 0.5 and "concat_mask" not in positive[0][1]
    assert torch.equal(latent["noise_mask"], big_mask)
    torch.testing.assert_close(latent["samples"], vae_math.encode(model, pixels))
    _, _, plain = InpaintModelConditioning().run(ctx, positive, negative, vae, pixels, mask, False)
    assert set(plain) == {"samples"}


def test_a_four_channel_model_ignores_the_concat_options(ctx: RecordingContext) -> None:
    model, clip, vae = load(ctx, "mini.safetensors")
    positive, negative = prompts(ctx, clip)
    pixels, mask = pixels_and_mask()
    pos, neg, latent = InpaintModelConditioning().run(ctx, positive, negative, vae, pixels, mask, True)
    seen: list[torch.Size] = []
    hook = model.unet.conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        with_options = sample(ctx, model, pos, neg, latent)
        without = sample(ctx, model, positive, negative, latent)
    finally:
        hook.remove()
    assert seen == [torch.Size((2, 4, 8, 8))] * 2
    assert torch.equal(with_options["samples"], without["samples"])


def test_inpaint_workflow_with_an_inpainting_checkpoint_writes_a_png(engine: Any) -> None:
    prompt: dict[str, Any] = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "mini_inpaint.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "image": {"class_type": "LoadImage", "inputs": {"image": "init_64.png"}},
        "mask": {"class_type": "LoadImageMask", "inputs": {"image": "mask_64.png", "channel": "red"}},
        "cond": {
            "class_type": "InpaintModelConditioning",
            "inputs": {
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "vae": ["ckpt", 2],
                "pixels": ["image", 0],
                "mask": ["mask", 0],
                "noise_mask": True,
            },
        },
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "positive": ["cond", 0],
                "negative": ["cond", 1],
                "latent_image": ["cond", 2],
                "seed": 3,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {
            "class_type": "SaveImage",
            "inputs": {"images": ["decode", 0], "filename_prefix": "inpaint9"},
        },
    }
    checked = validate_prompt(prompt, engine.registry, engine.env)
    assert checked.ok, (checked.error, checked.node_errors)
    events: list[Event] = []
    outcome = engine.executor.execute(checked.prompt, "inpaint9", events.append, outputs=checked.outputs)
    assert outcome.status == "success", outcome.error
    (entry,) = outcome.outputs["save"]["images"]
    path = Path(engine.env.folders.output_dir) / entry["subfolder"] / entry["filename"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_a_bad_concat_option_is_a_clear_error(ctx: RecordingContext, conv_inputs: Any) -> None:
    (model, clip, _), _ = conv_inputs
    positive, negative = prompts(ctx, clip)
    bad = [[positive[0][0], {**positive[0][1], "concat_latent_image": torch.zeros(4, 8, 8)}]]
    (empty,) = EmptyLatentImage().run(ctx, 64, 64, 1)
    with pytest.raises(ValueError, match="positive: conditioning option 'concat_latent_image' must be"):
        sample(ctx, model, bad, negative, empty)
