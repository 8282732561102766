"""A pixel budget for every image the engine or the server decodes, checked from the header.

A 17 KB PNG can declare 12000 x 12000 pixels and a 236 KB GIF 60 frames of 2048 x 2048: decoded to
float32 they cost gigabytes (the server was OOM-killed, D3). Pillow reads the size and the frame
count without decoding pixels, so each image is refused before decoding when one frame is over
`MAX_IMAGE_PIXELS` or all its frames together are over `MAX_BATCH_PIXELS`.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # Pillow is imported where an image is read, not with the package
    from PIL import Image as PILImage

# 8192 x 8192: bigger than any SD resolution; as float32 RGB 805 MB.
MAX_IMAGE_PIXELS = 8192 * 8192
# frames x width x height of one file: 128 Mpx, 1.5 GB as float32 RGB (512 frames of 512 x 512).
MAX_BATCH_PIXELS = 128 * 1024 * 1024


class ImageBudgetError(ValueError):
    """An image declares more pixels than the budget; the message names it and the limit."""


def open_checked(source: str | Any | IO[bytes], name: str, *, frames: bool = True) -> PILImage.Image:
    """The opened (not decoded) PIL image, after checking its declared size against the budget.

    Args:
        source: a path or a binary file object.
        name: how to name the image in the error.
        frames: count every frame (a loader that keeps them all); False for one-frame readers.
    Raises:
        ImageBudgetError: over the per-image or per-file budget.
        OSError, ValueError: not an image Pillow can read (UnidentifiedImageError is an OSError).
    """
    from PIL import Image

    # Pillow's own bomb check, lowered to our budget: the last guard for any other Image.open.
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as exc:  # over twice the budget: Pillow refuses first
        raise ImageBudgetError(
            f"'{name}' is over the limit of {MAX_IMAGE_PIXELS:,} pixels per image ({exc}); "
            "use a smaller image"
        ) from exc
    try:
        check_budget(img, name, frames=frames)
    except BaseException:
        img.close()
        raise
    return img


def check_budget(img: PILImage.Image, name: str, *, frames: bool = True) -> None:
    """Raise ImageBudgetError if `img` (opened, not decoded) is over the pixel budget."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageBudgetError(
            f"'{name}' is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS:,} pixels "
            "per image; use a smaller image"
        )
    count = int(getattr(img, "n_frames", 1) or 1) if frames else 1
    if count * width * height > MAX_BATCH_PIXELS:
        raise ImageBudgetError(
            f"'{name}' has {count} frames of {width}x{height} pixels, over the limit of "
            f"{MAX_BATCH_PIXELS:,} pixels per file (frames x width x height); use fewer or smaller frames"
        )
