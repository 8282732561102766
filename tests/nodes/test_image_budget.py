"""Image bombs are refused from their headers before decoding, in every image reader (D3)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from nodegraph import images
from nodes.image import ImageFileError, load_image_file
from nodes.inpaint import load_mask_file


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A 69-byte PNG that declares width x height (1-bit) and holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def gif(path: Path, frames: int, size: int) -> Path:
    shots = [Image.new("L", (size, size), i * 20 % 256) for i in range(frames)]
    shots[0].save(path, save_all=True, append_images=shots[1:], duration=10)
    return path


def test_a_huge_declared_image_is_refused_by_every_reader(tmp_path: Path) -> None:
    path = png_header_only(tmp_path / "bomb.png", 12000, 12000)
    with pytest.raises(ImageFileError, match="'bomb.png' is .*over the limit"):
        load_image_file(path, "bomb.png")
    with pytest.raises(ImageFileError, match="over the limit"):
        load_mask_file(path, "bomb.png", "alpha")


def test_frames_count_against_the_batch_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_BATCH_PIXELS", 10 * 32 * 32)
    many = gif(tmp_path / "many.gif", 12, 32)
    with pytest.raises(ImageFileError, match="'many.gif' has 12 frames of 32x32 pixels"):
        load_image_file(many, "many.gif")
    image, mask = load_image_file(gif(tmp_path / "few.gif", 8, 32), "few.gif")
    assert image.shape == (8, 32, 32, 3) and mask.shape[0] == 8
    single = load_mask_file(many, "many.gif", "red")  # a mask reads one frame: not over
    assert single.shape == (1, 32, 32)


def test_backslashes_in_a_save_prefix_are_folders(tmp_path: Path) -> None:
    from nodegraph.folders import PathEscapeError
    from nodes.image import save_path

    folder, stem, _, subfolder = save_path("sub\\pic", tmp_path, 8, 8)
    assert folder == (tmp_path / "sub").resolve() and stem == "pic" and subfolder == "sub"
    with pytest.raises(PathEscapeError):  # was saved as '..\\x_00001_.png', which /view refuses
        save_path("..\\x", tmp_path, 8, 8)
