"""Mask and image nodes against ComfyUI's formulas on small tensors (nodes_mask.py,
nodes_post_processing.py, nodes.py ImageCrop), and their declarations against ComfyUI's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image

from nodegraph.testing import RecordingContext
from nodes import all_nodes
from nodes.image_filters import ImageBlend, ImageBlur, ImageCrop, ImageQuantize, ImageSharpen, gaussian_kernel
from nodes.mask import (
    CropMask,
    FeatherMask,
    GrowMask,
    ImageColorToMask,
    ImageCompositeMasked,
    ImageToMask,
    InvertMask,
    LatentCompositeMasked,
    MaskComposite,
    MaskToImage,
    SolidMask,
    ThresholdMask,
)

BY_ID = {cls.NODE_ID: cls for cls in all_nodes()}
CTX: Any = RecordingContext(env=None)  # type: ignore[arg-type]  # these nodes never read the environment


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---- declarations: (input name, type, options) in order, as ComfyUI's /object_info lists them
R = 16384
DECLARED: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "SolidMask": [
        ("value", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        ("width", "INT", {"default": 512, "min": 1, "max": R, "step": 1}),
        ("height", "INT", {"default": 512, "min": 1, "max": R, "step": 1}),
    ],
    "CropMask": [("mask", "MASK", {})]
    + [(n, "INT", {"default": 0, "min": 0, "max": R, "step": 1}) for n in ("x", "y")]
    + [(n, "INT", {"default": 512, "min": 1, "max": R, "step": 1}) for n in ("width", "height")],
    "FeatherMask": [("mask", "MASK", {})]
    + [(n, "INT", {"default": 0, "min": 0, "max": R, "step": 1}) for n in ("left", "top", "right", "bottom")],
    "GrowMask": [
        ("mask", "MASK", {}),
        ("expand", "INT", {"default": 0, "min": -R, "max": R, "step": 1}),
        ("tapered_corners", "BOOLEAN", {"default": True}),
    ],
    "ThresholdMask": [
        ("mask", "MASK", {}),
        ("value", "FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
    ],
    "MaskComposite": [("destination", "MASK", {}), ("source", "MASK", {})]
    + [(n, "INT", {"default": 0, "min": 0, "max": R, "step": 1}) for n in ("x", "y")]
    + [("operation", "COMBO", {})],
    "ImageCompositeMasked": [("destination", "IMAGE", {}), ("source", "IMAGE", {})]
    + [(n, "INT", {"default": 0, "min": 0, "max": R, "step": 1}) for n in ("x", "y")]
    + [("resize_source", "BOOLEAN", {"default": False})],
    "ImageCrop": [("image", "IMAGE", {})]
    + [(n, "INT", {"default": 512, "min": 1, "max": R, "step": 1}) for n in ("width", "height")]
    + [(n, "INT", {"default": 0, "min": 0, "max": R, "step": 1}) for n in ("x", "y")],
    "ImageBlur": [
        ("image", "IMAGE", {}),
        ("blur_radius", "INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
        ("sigma", "FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
    ],
    "ImageSharpen": [
        ("image", "IMAGE", {}),
        ("sharpen_radius", "INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
        ("sigma", "FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}),
        ("alpha", "FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01}),
    ],
    "ImageQuantize": [
        ("image", "IMAGE", {}),
        ("colors", "INT", {"default": 256, "min": 1, "max": 256, "step": 1}),
        ("dither", "COMBO", {}),
    ],
    "ImageBlend": [
        ("image1", "IMAGE", {}),
        ("image2", "IMAGE", {}),
        ("blend_factor", "FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
        ("blend_mode", "COMBO", {}),
    ],
    "ImageToMask": [("image", "IMAGE", {}), ("channel", "COMBO", {})],
    "MaskToImage": [("mask", "MASK", {})],
    "InvertMask": [("mask", "MASK", {})],
    "ImageColorToMask": [
        ("image", "IMAGE", {}),
        ("color", "INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
    ],
}


@pytest.mark.parametrize("node_id", sorted(DECLARED))
def test_declared_as_comfyui_declares_it(node_id: str) -> None:
    info = BY_ID[node_id].info(None)
    required = info["input"]["required"]
    assert info["input_order"]["required"] == [name for name, _, _ in DECLARED[node_id]]
    for name, kind, options in DECLARED[node_id]:
        spec = required[name]
        assert (spec[0] if isinstance(spec[0], str) else "COMBO") == kind, name
        assert {k: spec[1][k] for k in options} == options, name
    assert len(info["output"]) == (0 if node_id == "MaskPreview" else 1)


def test_choice_lists_and_optional_masks() -> None:
    assert BY_ID["MaskComposite"].info(None)["input"]["required"]["operation"][0] == [
        "multiply", "add", "subtract", "and", "or", "xor",
    ]  # fmt: skip
    assert BY_ID["ImageQuantize"].info(None)["input"]["required"]["dither"][0] == [
        "none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16",
    ]  # fmt: skip
    assert BY_ID["ImageToMask"].info(None)["input"]["required"]["channel"][0] == [
        "red",
        "green",
        "blue",
        "alpha",
    ]
    for node_id in ("ImageCompositeMasked", "LatentCompositeMasked"):
        assert BY_ID[node_id].info(None)["input"]["optional"] == {"mask": ["MASK", {}]}
    assert BY_ID["ImageToMask"].info(None)["display_name"] == "Convert Image to Mask"


# ---- numerics


def test_solid_invert_threshold_and_conversions() -> None:
    (solid,) = SolidMask().run(CTX, 0.25, 5, 3)
    assert solid.shape == (1, 3, 5) and torch.all(solid == 0.25)
    m = rand(2, 4, 4)
    assert torch.equal(InvertMask().run(CTX, m)[0], 1.0 - m)
    assert torch.equal(ThresholdMask().run(CTX, m, 0.5)[0], (m > 0.5).float())
    (image,) = MaskToImage().run(CTX, m)
    assert image.shape == (2, 4, 4, 3) and torch.equal(image[..., 1], m)
    rgb = rand(2, 4, 4, 3)
    assert torch.equal(ImageToMask().run(CTX, rgb, "green")[0], rgb[:, :, :, 1])
    with pytest.raises(ValueError, match="no alpha channel"):
        ImageToMask().run(CTX, rgb, "alpha")


def test_image_color_to_mask_is_255_on_the_colour() -> None:
    image = torch.zeros(1, 2, 2, 3)
    image[0, 0, 1] = torch.tensor([1.0, 128 / 255, 0.0])
    (mask,) = ImageColorToMask().run(CTX, image, 0xFF8000)
    assert mask.tolist() == [[[0.0, 255.0], [0.0, 0.0]]]


def test_crop_mask_and_image_crop() -> None:
    m = rand(1, 6, 7)
    assert torch.equal(CropMask().run(CTX, m, 2, 1, 3, 4)[0], m[:, 1:5, 2:5])
    img = rand(1, 6, 7, 3)
    assert torch.equal(ImageCrop().run(CTX, img, 3, 2, 2, 1)[0], img[:, 1:3, 2:5])
    # an origin past the edge is clamped to the last pixel (nodes.py ImageCrop)
    assert ImageCrop().run(CTX, img, 3, 3, 50, 50)[0].shape == (1, 1, 1, 3)


@pytest.mark.parametrize("operation", ["multiply", "add", "subtract", "and", "or", "xor"])
def test_mask_composite_follows_comfyui(operation: str) -> None:
    dest, src = rand(1, 6, 6, seed=1), rand(1, 3, 4, seed=2)
    x, y = 3, 4  # the source hangs over the right and bottom edges
    want = dest.clone()
    d, s = dest[:, y:6, x:6], src[:, : 6 - y, : 6 - x]
    ops = {
        "multiply": lambda: d * s,
        "add": lambda: d + s,
        "subtract": lambda: d - s,
        "and": lambda: torch.bitwise_and(d.round().bool(), s.round().bool()).float(),
        "or": lambda: torch.bitwise_or(d.round().bool(), s.round().bool()).float(),
        "xor": lambda: torch.bitwise_xor(d.round().bool(), s.round().bool()).float(),
    }
    want[:, y:6, x:6] = ops[operation]()
    (got,) = MaskComposite().run(CTX, dest, src, x, y, operation)
    assert torch.equal(got, torch.clamp(want, 0.0, 1.0))


def test_feather_mask_keeps_comfyuis_off_by_one() -> None:
    (got,) = FeatherMask().run(CTX, torch.ones(1, 4, 6), 2, 0, 3, 2)
    row = got[0, 2]  # a middle row: only the left/right feathering
    # left: columns 0, 1 times 1/2, 2/2; right: x=0 -> column 0 (x1/3), x=1 -> column 5 (x2/3),
    # x=2 -> column 4 (x3/3)
    assert row.tolist() == pytest.approx([0.5 / 3, 1.0, 1.0, 1.0, 1.0, 2 / 3])
    # bottom 2: row 0 times 1/2, row 3 times 2/2
    assert got[0, 0, 2].item() == pytest.approx(0.5) and got[0, 3, 2].item() == pytest.approx(1.0)


@pytest.mark.parametrize(("expand", "tapered"), [(2, True), (1, False), (-1, True), (-2, False), (0, True)])
def test_grow_mask_is_scipys_grey_dilation_and_erosion(expand: int, tapered: bool) -> None:
    m = (rand(2, 9, 8, seed=3) > 0.7).float() * rand(2, 9, 8, seed=4)
    if expand < 0:
        m = 1 - m
    c = 0 if tapered else 1
    kernel = np.array([[c, 1, c], [1, 1, 1], [c, 1, c]])
    want = []
    for one in m:
        out = one.numpy()
        for _ in range(abs(expand)):
            op = scipy.ndimage.grey_erosion if expand < 0 else scipy.ndimage.grey_dilation
            out = op(out, footprint=kernel)
        want.append(torch.from_numpy(out))
    (got,) = GrowMask().run(CTX, m, expand, tapered)
    assert torch.equal(got, torch.stack(want))


def _comfy_composite(
    dest: torch.Tensor, src: torch.Tensor, x: int, y: int, mask: torch.Tensor, mult: int
) -> Any:
    """nodes_mask.composite written out for one case that fits (no resize, same batch)."""
    left, top = x // mult, y // mult
    vw, vh = dest.shape[3] - left, dest.shape[2] - top
    m = F.interpolate(mask.reshape((-1, 1, *mask.shape[-2:])), size=src.shape[2:], mode="bilinear")
    m = m[:, :, :vh, :vw]
    out = dest.clone()
    region = out[:, :, top : top + src.shape[2], left : left + src.shape[3]]
    region[...] = m * src[:, :, :vh, :vw] + (1 - m) * region
    return out


def test_image_and_latent_composite_masked() -> None:
    dest, src, mask = rand(1, 8, 8, 3, seed=5), rand(1, 4, 5, 3, seed=6), rand(1, 2, 2, seed=7)
    (got,) = ImageCompositeMasked().run(CTX, dest, src, 5, 2, False, mask)
    want = _comfy_composite(dest.movedim(-1, 1), src.movedim(-1, 1), 5, 2, mask, 1).movedim(1, -1)
    assert torch.equal(got, want) and torch.equal(dest, rand(1, 8, 8, 3, seed=5))  # input untouched
    latent: dict[str, Any] = {"samples": rand(1, 4, 8, 8, seed=8), "noise_mask": "kept"}
    (out,) = LatentCompositeMasked().run(
        CTX, latent, {"samples": rand(1, 4, 3, 3, seed=9)}, 16, 8, False, mask
    )
    assert out["noise_mask"] == "kept"
    want_latent = _comfy_composite(latent["samples"], rand(1, 4, 3, 3, seed=9), 16, 8, mask, 8)
    assert torch.equal(out["samples"], want_latent)
    (plain,) = ImageCompositeMasked().run(CTX, dest, src, 0, 0, False, None)
    assert torch.equal(plain[:, :4, :5], src) and torch.equal(plain[:, 4:], dest[:, 4:])


def _comfy_filter(image: torch.Tensor, kernel: torch.Tensor, radius: int) -> torch.Tensor:
    """ComfyUI's Blur/Sharpen body: reflect pad, conv with zero padding, crop."""
    channels = image.shape[-1]
    k = kernel.repeat(channels, 1, 1).unsqueeze(1)
    x = F.pad(image.permute(0, 3, 1, 2), (radius,) * 4, "reflect")
    out = F.conv2d(x, k, padding=kernel.shape[-1] // 2, groups=channels)[:, :, radius:-radius, radius:-radius]
    return out.permute(0, 2, 3, 1)


def test_gaussian_kernel_is_comfyuis() -> None:
    k = gaussian_kernel(3, 1.0)
    w = np.exp(-np.array([[2, 1, 2], [1, 0, 1], [2, 1, 2]]) / 2.0)
    assert np.allclose(k.numpy(), w / w.sum())


def test_blur_and_sharpen_follow_comfyui() -> None:
    image = rand(2, 9, 10, 3, seed=10)
    (blurred,) = ImageBlur().run(CTX, image, 2, 1.5)
    assert torch.equal(blurred, _comfy_filter(image, gaussian_kernel(5, 1.5), 2))
    kernel = gaussian_kernel(3, 1.0) * -(0.7 * 10)
    kernel[1, 1] = kernel[1, 1] - kernel.sum() + 1.0
    (sharp,) = ImageSharpen().run(CTX, image, 1, 1.0, 0.7)
    assert torch.equal(sharp, torch.clamp(_comfy_filter(image, kernel, 1), 0, 1))
    flat = torch.full((1, 5, 5, 3), 0.3)
    assert torch.allclose(ImageSharpen().run(CTX, flat, 2, 1.0, 1.0)[0], flat, atol=1e-6)  # kernel sums to 1


@pytest.mark.parametrize("mode", ["normal", "multiply", "screen", "overlay", "soft_light", "difference"])
def test_blend_modes(mode: str) -> None:
    a, b = rand(1, 4, 4, 3, seed=11), rand(1, 4, 4, 3, seed=12)
    g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
    modes = {
        "normal": b,
        "multiply": a * b,
        "screen": 1 - (1 - a) * (1 - b),
        "overlay": torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
        "soft_light": torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a)),
        "difference": a - b,
    }
    (got,) = ImageBlend().run(CTX, a, b, 0.3, mode)
    assert torch.equal(got, torch.clamp(a * 0.7 + modes[mode] * 0.3, 0, 1))


def test_blend_resizes_image2_to_image1() -> None:
    (got,) = ImageBlend().run(CTX, rand(1, 8, 8, 3), rand(1, 4, 6, 3), 0.5, "normal")
    assert got.shape == (1, 8, 8, 3)


@pytest.mark.parametrize("dither", ["none", "floyd-steinberg", "bayer-4"])
def test_quantize_uses_pillows_palette(dither: str) -> None:
    image = rand(1, 12, 12, 3, seed=13)
    (got,) = ImageQuantize().run(CTX, image, 4, dither)
    colours = {tuple(p) for p in (got[0] * 255).round().reshape(-1, 3).tolist()}
    assert len(colours) <= 4
    if dither != "bayer-4":
        im = Image.fromarray((image[0] * 255).to(torch.uint8).numpy(), mode="RGB")
        d = Image.Dither.NONE if dither == "none" else Image.Dither.FLOYDSTEINBERG
        want = np.array(im.quantize(palette=im.quantize(colors=4), dither=d).convert("RGB"))
        assert torch.equal(got[0], torch.from_numpy(want).float() / 255)


def test_batch_size_flip_rotate_and_total_pixels() -> None:
    from nodes.image_batch import (
        GetImageSize,
        ImageFlip,
        ImageFromBatch,
        ImageRotate,
        ImageScaleToTotalPixels,
        RepeatImageBatch,
    )

    img = rand(3, 4, 6, 3, seed=14)
    assert torch.equal(RepeatImageBatch().run(CTX, img, 2)[0], torch.cat([img, img]))
    assert torch.equal(ImageFromBatch().run(CTX, img, 2, 5)[0], img[2:3])  # clamped to the batch
    assert torch.equal(ImageFromBatch().run(CTX, img, 9, 2)[0], img[2:3])
    assert GetImageSize().run(CTX, img) == (6, 4, 3)
    assert torch.equal(ImageFlip().run(CTX, img, "x-axis: vertically")[0], img.flip(1))
    assert torch.equal(ImageFlip().run(CTX, img, "y-axis: horizontally")[0], img.flip(2))
    (turned,) = ImageRotate().run(CTX, img, "90 degrees")
    assert turned.shape == (3, 6, 4, 3) and torch.equal(turned[:, 0, :, :], img[:, :, 0, :].flip(1))
    (scaled,) = ImageScaleToTotalPixels().run(CTX, img, "bilinear", 0.01)
    side = (0.01 * 1024 * 1024 / 24) ** 0.5
    assert scaled.shape == (3, round(4 * side), round(6 * side), 3)
    info = BY_ID["GetImageSize"].info(None)
    assert (info["output"], info["output_name"]) == (["INT", "INT", "INT"], ["width", "height", "batch_size"])
    assert BY_ID["ImageFromBatch"].info(None)["input"]["required"]["batch_index"][1] == {
        "default": 0, "min": 0, "max": 4095, "step": 1,
    }  # fmt: skip
