"""Reading the text chunks of a PNG file (where ComfyUI stores a saved image's prompt and workflow)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The tEXt, zTXt and iTXt chunks of a PNG as {keyword: text}.

    Hand-written because only the text chunks are wanted: no pixel decoding, and no cap on chunk
    size (Pillow refuses text chunks over 1 MB, and large workflows exceed that).
    """
    texts: dict[str, str] = {}
    for kind, body in _png_chunks(data):
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\x00")
                texts[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\x00")
                texts[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\x00")
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\x00")
                _translated, _, value = rest.partition(b"\x00")
                raw = zlib.decompress(value) if compressed else value
                texts[key.decode("latin-1")] = raw.decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue  # one damaged chunk should not hide the others
    return texts


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        yield kind, data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            return
        pos += 12 + length
