"""The parts of an A1111 request that are not plain numbers: the fields nodegraph refuses (by name),
and the init image and inpainting mask, written into the input folder the way A1111 prepares them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import uuid
from pathlib import Path
from typing import Any

from nodegraph.images import ImageBudgetError, open_checked
from nodegraph.server.a1111 import A1111Error, Inpaint, read_float, read_int

# Fields whose non-default value asks for a feature nodegraph does not have (default: the values
# A1111's API and webuiapi send when the feature is off).
_OFF: dict[str, tuple[Any, ...]] = {
    "restore_faces": (None, False),
    "tiling": (None, False),
    "styles": (None, []),
    "script_name": (None, ""),
    "alwayson_scripts": (None, {}),
    "refiner_checkpoint": (None, "", "None"),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "hr_sampler_name": (None, "", "Use same sampler"),
    "hr_scheduler": (None, "", "Use same scheduler"),
    "hr_prompt": (None, ""),
    "hr_negative_prompt": (None, ""),
}
_WHY = {
    "restore_faces": "face restoration (GFPGAN/CodeFormer) is not available",
    "tiling": "tiling is not available",
    "styles": "no prompt styles are defined (GET /sdapi/v1/prompt-styles lists none)",
    "script_name": "A1111 scripts do not run here",
    "alwayson_scripts": "A1111 extensions (ControlNet, ADetailer, ...) do not run here; use a ComfyUI graph",
    "refiner_checkpoint": "the refiner switch is not mapped; use a ComfyUI graph",
    "hr_checkpoint_name": "hires fix uses the same checkpoint here",
    "hr_sampler_name": "hires fix uses the first pass's sampler here",
    "hr_scheduler": "hires fix uses the first pass's schedule type here",
    "hr_prompt": "hires fix uses the main prompt here",
    "hr_negative_prompt": "hires fix uses the main negative prompt here",
}


def refuse_unsupported(body: dict[str, Any]) -> None:
    """Raise A1111Error naming the first field that asks for something nodegraph cannot do."""
    for key, off in _OFF.items():
        value = body.get(key)
        if value not in off and not (key.startswith("hr_") and value == body.get(key[3:])):
            raise A1111Error(f"{key}: {_WHY[key]}; send {off[-1]!r} (got {value!r})")
    if read_float(body, "subseed_strength", 0.0, 0.0, 1.0) > 0:
        raise A1111Error("subseed_strength: variation seeds are not available; send 0")


def decode_image(raw: str) -> bytes:
    """Base64 image data, with or without a `data:image/...;base64,` prefix."""
    if raw.startswith("data:"):
        raw = raw.split(",", 1)[-1]
    try:
        return base64.b64decode(raw, validate=False)
    except ValueError as exc:
        raise ValueError(f"not base64 ({exc})") from exc


def open_image(raw: Any, field: str, *, decode: bool = True) -> Any:
    """The base64 image of a request field, opened within the pixel budget (checked from its header,
    before decoding: a 17 KB PNG can declare 12000 x 12000) and, with `decode`, decoded.

    Raises:
        A1111Error: naming the field: not a string, not base64, not an image, over the budget, damaged.
    """
    if not isinstance(raw, str) or not raw:
        raise A1111Error(f"{field}: send a base64-encoded image")
    try:
        data = decode_image(raw)
    except ValueError as exc:
        raise A1111Error(f"{field}: {exc}") from exc
    try:
        image = open_checked(io.BytesIO(data), field, frames=False)
    except ImageBudgetError as exc:
        raise A1111Error(f"{field}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow's readers raise many kinds on damaged headers
        raise A1111Error(f"{field}: not a readable image ({type(exc).__name__}: {exc})") from exc
    if decode:
        try:
            image.load()
        except Exception as exc:  # noqa: BLE001 - and its decoders as many on damaged data
            image.close()
            raise A1111Error(f"{field}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return image


def _store(input_dir: Path, prefix: str, image: Any) -> str:
    """Write `image` as PNG into the input folder under its content hash; the LoadImage name."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    name = f"{prefix}_{hashlib.sha256(data).hexdigest()[:16]}.png"
    path = input_dir / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{uuid.uuid4().hex}.partial")
        try:  # never a half-written image under the real name, nor a partial one left behind
            partial.write_bytes(data)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
    return name


def save_init_image(input_dir: Path, raw: Any, field: str = "init_images") -> str:
    """The first init image (or the request's `field`), written once into the input folder; its
    LoadImage name."""
    with open_image(raw, field) as image:
        return _store(input_dir, "a1111", image if image.mode in ("RGB", "RGBA") else image.convert("RGB"))


def save_mask(
    input_dir: Path, body: dict[str, Any], width: int, height: int, init_size: tuple[int, int]
) -> Inpaint:
    """img2img's `mask` prepared as A1111 does (modules/processing.py, StableDiffusionProcessingImg2Img
    .init): made binary (alpha if it has one, else luminance, > 128), inverted for
    `inpainting_mask_invert`, blurred by `mask_blur`; white is repainted. For the whole picture it is
    resized to the output size; for "Only masked" (`inpaint_full_res`, A1111's default) the masked
    box plus `inpaint_full_res_padding`, widened to the output's aspect ratio, is what gets repainted."""
    from PIL import Image, ImageFilter, ImageOps

    fill = body.get("inpainting_fill", 0)
    if isinstance(fill, bool) or fill not in (0, 1, 2, 3):
        raise A1111Error(
            f"inpainting_fill: {fill!r} is not one of A1111's masked contents: 0 fill, 1 original, "
            "2 latent noise, 3 latent nothing"
        )
    blur = read_int(body, "mask_blur", 4, 0, 64)
    padding = read_int(body, "inpaint_full_res_padding", 0, 0, 1024)
    with open_image(body.get("mask"), "mask") as image:
        if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
            mask = image.split()[-1].convert("L")
        else:
            mask = image.convert("L")
    mask = mask.point(lambda v: 255 if v > 128 else 0)
    inverted = body.get("inpainting_mask_invert") in (1, True)
    if inverted:
        mask = ImageOps.invert(mask)
    if mask.size != init_size:
        mask = mask.resize(init_size, Image.Resampling.LANCZOS)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    spec = Inpaint(mask_image="", fill=int(fill), blur=blur)
    if body.get("inpaint_full_res", True) not in (False, 0):  # A1111's default: "Only masked"
        box = mask.getbbox()
        if box is None:
            how = " once inverted (inpainting_mask_invert)" if inverted else ""
            raise A1111Error(f"mask: the mask is empty{how}: nothing to repaint")
        x1, y1, x2, y2 = _fit_ratio(_padded(box, padding, init_size), width / height, init_size)
        spec.region = (x1, y1, x2 - x1, y2 - y1)
        mask = mask.crop((x1, y1, x2, y2))
        spec.overlay_mask = _store(input_dir, "a1111_mask", mask.convert("RGB"))
    mask = mask.resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
    spec.mask_image = _store(input_dir, "a1111_mask", mask)
    return spec


def _padded(box: tuple[int, int, int, int], pad: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, size[0]), min(y2 + pad, size[1])


def _fit_ratio(
    box: tuple[int, int, int, int], ratio: float, size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The box grown along one axis to width/height = `ratio` (the output's), centred, shifted back
    inside the image and cut at its edge (modules/masking.py expand_crop_region's rule)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > ratio:  # too wide for the output: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), size[1])
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), size[0])
    return x1, y1, x2, y2


def _grow(low: int, high: int, extra: int, limit: int) -> tuple[int, int]:
    low, high = low - extra // 2, high + extra - extra // 2
    if high > limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, min(high - low, limit)
    return low, high
