"""Our safetensors reader refuses crafted and damaged files at open, and short reads at load (D4)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from nodes.sd.safetensors_file import CheckpointError, SafetensorsSource


def _raw(path: Path, header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> Path:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(begin: int, end: int, shape: list[int], dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


CRAFTED = {
    "negative begin (12 GiB claim)": ({"w": _entry(-(12 << 30), 16, [(12 << 30) // 4 + 4])}, 16),
    "begin after end": ({"w": _entry(16, 0, [0])}, 16),
    "end past the data": ({"w": _entry(0, 1 << 40, [1 << 38])}, 16),
    "overlap": ({"a": _entry(0, 16, [4]), "b": _entry(8, 24, [4])}, 24),
    "unknown dtype": ({"w": _entry(0, 16, [16], "F8_E9M9")}, 16),
    "negative shape": ({"w": _entry(0, 16, [-4, -1])}, 16),
    "shape x dtype != size": ({"w": _entry(0, 16, [3])}, 16),
    "float offsets": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, 16),
    "metadata list": ({"__metadata__": ["x"], "w": _entry(0, 16, [4])}, 16),
    "header a list": ([1, 2], 0),
    "entry a string": ({"w": "x"}, 0),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_headers_are_refused_at_open(tmp_path: Path, case: str) -> None:
    header, size = CRAFTED[case]
    path = _raw(tmp_path / "evil.safetensors", header, b"\0" * size)
    with pytest.raises(CheckpointError, match="'evil.safetensors'"):
        SafetensorsSource(path)


def test_deep_json_and_huge_header_lengths_are_refused(tmp_path: Path) -> None:
    deep = _raw(tmp_path / "deep.safetensors", None, raw_header=b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(CheckpointError, match="nests deeper"):
        SafetensorsSource(deep)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 63) + b"{}")
    with pytest.raises(CheckpointError, match="'huge.safetensors'.*claims"):
        SafetensorsSource(huge)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\0")
    with pytest.raises(CheckpointError, match="'short.safetensors'"):
        SafetensorsSource(short)


def test_a_file_truncated_after_open_is_an_error_not_zero_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(64), "b": torch.full((64,), 2.0)}, str(path))
    source = SafetensorsSource(path)
    assert torch.equal(source.get("a"), torch.ones(64))
    with open(path, "r+b") as f:  # cut in place, as a copy being overwritten would be
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="'model.safetensors' changed or was cut short"):
        source.get("b")


def test_a_valid_file_reads_back_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    tensors = {"x": torch.arange(6, dtype=torch.float16).reshape(2, 3), "e": torch.zeros(0)}
    save_file(tensors, str(path), metadata={"k": "v"})
    source = SafetensorsSource(path)
    assert sorted(source.keys()) == ["e", "x"]
    assert torch.equal(source.get("x"), tensors["x"]) and source.get("e").shape == (0,)
    assert source.metadata() == {"k": "v"}
