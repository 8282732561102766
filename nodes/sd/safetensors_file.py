"""Our .safetensors reader: every header entry validated at open, every read's length checked.

A crafted or damaged file must be an error naming the file, never an allocation of whatever the
header claims nor zero-filled weights that load "successfully". So at open: the header length is
bounded, its JSON may not nest (a flat object of flat entries is all the format has), each entry has
a known dtype, a non-negative shape whose size times the dtype's width is exactly its byte range,
0 <= begin <= end <= data size, and no two ranges overlap. Each `get` then reads exactly that many
bytes or fails (the file was truncated or replaced while loading).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from nodes.sd.header_json import MAX_HEADER_DEPTH, json_depth_ok


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or built; the message names the file and what to do."""


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip

# The Rust reader's limit; real SD/SDXL headers are 50-300 KB.
MAX_HEADER_SIZE = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[int, dict[str, Any], int]:
    """(data start, header object, file size) of a .safetensors file; ValueError/OSError if malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("the file is shorter than the 8-byte header length")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_SIZE:
            raise ValueError(f"the header claims {n} bytes (over {MAX_HEADER_SIZE})")
        if n > size - 8:
            raise ValueError("the header does not fit in the file")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError("the header was cut short while reading")
    if not json_depth_ok(raw, MAX_HEADER_DEPTH):
        raise ValueError(f"the header's JSON nests deeper than {MAX_HEADER_DEPTH} levels")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return 8 + n, header, size


def _check_entry(key: str, entry: Any) -> tuple[int, int]:
    """(begin, end) of one tensor entry after checking dtype, shape and that shape x dtype = size."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {key!r}: entry is not an object")
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise ValueError(f"tensor {key!r}: unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {key!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise ValueError(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ValueError(f"tensor {key!r}: data_offsets {offsets} are not 0 <= begin <= end")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {key!r}: {end - begin} bytes do not hold shape {shape} of {entry['dtype']}")
    return begin, end


class SafetensorsSource:
    """A .safetensors file read one tensor at a time with plain reads.

    Not memory-mapped on purpose: pages of a mapped file count in the process's RSS for as long as
    the mapping lives, which during a load doubled the peak (mapped fp16 file + fp32 modules).
    Reading each tensor into a transient buffer keeps the peak at the modules' size plus one tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._start, header, size = read_header(path)
            self._size = size
            meta = header.pop("__metadata__", None) or {}
            if not isinstance(meta, dict):
                raise ValueError("__metadata__ is not an object")
            self._meta = meta
            ranges = sorted((_check_entry(k, e), k) for k, e in header.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise CheckpointError(
                f"'{path.name}' is not a readable .safetensors file ({exc}); it may be truncated or not "
                "a model at all: download it again"
            ) from exc
        self._entries: dict[str, dict[str, Any]] = header
        previous_end, previous = 0, ""
        for (begin, end), key in ranges:
            if begin < previous_end:
                raise CheckpointError(
                    f"'{path.name}' is damaged: tensors {previous!r} and {key!r} overlap in the file; "
                    "download it again"
                )
            if begin != end:
                previous_end, previous = end, key
        end = max((r[0][1] for r in ranges), default=0)
        if self._start + end > size:
            raise CheckpointError(
                f"'{path.name}' is truncated: its header promises {self._start + end} bytes, the file has "
                f"{size}; download it again"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def get(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]  # checked at open: end - begin = shape x dtype
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        buffer = bytearray(end - begin)
        view, got = memoryview(buffer), 0
        with open(self.path, "rb") as f:
            changed = os.fstat(f.fileno()).st_size != self._size
            f.seek(self._start + begin)
            while not changed and got < len(buffer) and (n := f.readinto(view[got:])):
                got += n
        if changed or got != len(buffer):
            raise CheckpointError(
                f"'{self.path.name}' changed or was cut short while reading tensor {key} ({got} of "
                f"{len(buffer)} bytes); download it again"
            )
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def metadata(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._meta.items()}
