"""The `DeviceInfo` service `/system_stats` reads: the `--device` setting, and a GPU's name and memory."""

from __future__ import annotations

import types
from typing import Any

import pytest

from nodes import device_info
from nodes.device_info import TorchDeviceInfo


def test_the_device_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    fake: Any = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setattr(device_info, "torch", fake)
    auto = TorchDeviceInfo("auto").describe()
    assert (auto["name"], auto["type"]) == ("cpu", "cpu")  # no GPU: auto is the CPU
    assert TorchDeviceInfo("mps").describe()["type"] == "mps"
    gib = 1 << 30
    fake.cuda = types.SimpleNamespace(
        is_available=lambda: True,
        current_device=lambda: 0,
        mem_get_info=lambda i: (3 * gib, 8 * gib),
        memory_reserved=lambda i: 2 * gib,
        memory_allocated=lambda i: gib,
        get_device_name=lambda i: f"GPU{i}",
    )
    gpu = TorchDeviceInfo("auto").describe()
    assert (gpu["name"], gpu["type"], gpu["vram_total"], gpu["vram_free"]) == (
        "cuda:0 GPU0",
        "cuda",
        8 * gib,
        3 * gib,
    )
    assert (gpu["torch_vram_total"], gpu["torch_vram_free"]) == (2 * gib, gib)
