"""The node layer's `DeviceInfo` service: the device `/system_stats` reports, read from torch."""

from __future__ import annotations

from typing import Any

import torch

from nodegraph.services import cpu_device


class TorchDeviceInfo:
    """`nodegraph.services.DeviceInfo` for the `--device` setting ("auto", "cpu", "cuda", "cuda:N", "mps")."""

    def __init__(self, setting: str) -> None:
        self.setting = setting or "auto"

    def describe(self) -> dict[str, Any]:
        """A GPU reports its name and memory as ComfyUI does; anything else is named as set."""
        setting = self.setting
        if setting not in ("auto", "cuda") and not setting.startswith("cuda:"):
            return cpu_device() | {"name": setting, "type": setting.split(":")[0]}
        try:
            if not torch.cuda.is_available():
                return cpu_device() if setting == "auto" else cpu_device() | {"name": setting, "type": "cuda"}
            index = int(setting.split(":")[1]) if ":" in setting else torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(index)
            reserved = torch.cuda.memory_reserved(index)
        except Exception:  # noqa: BLE001 - a stats route must answer even if the driver does not
            return cpu_device() | {"name": setting, "type": "cuda"}
        return {
            "name": f"cuda:{index} {torch.cuda.get_device_name(index)}",
            "type": "cuda",
            "index": index,
            "vram_total": total,
            "vram_free": free,
            "torch_vram_total": reserved,
            "torch_vram_free": reserved - torch.cuda.memory_allocated(index),
        }
