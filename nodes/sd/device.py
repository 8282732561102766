"""Where the models compute, and in which precision: ComfyUI's defaults for SD1.x.

`placement(settings)` turns the engine's `device` and `precision` settings (any value with those
two attributes, such as the engine's environment) into a `Placement`:

* device "auto": the first CUDA GPU when torch has one, else Apple's MPS, else the CPU; or a name
  ("cpu", "cuda", "cuda:1", "mps"). A GPU asked for but missing is a clear error.
* precision "auto": on a GPU the UNet and text encoder run in fp16 and the VAE in bf16 where the
  GPU supports it, else fp32 (ComfyUI avoids an fp16 VAE: it overflows to NaN); on the CPU
  everything is fp32 (the parity tests' setting). "fp32", "fp16" and "bf16" set the UNet and text
  encoder (and "fp32" the VAE too).

Models stay where the loader put them (CPU, fp32) until first used: `place(module, device, dtype)`
moves a shared module once. Values passed between nodes (latents, conditioning, images) stay on
the CPU in fp32, as in ComfyUI; only the computation inside a node goes to the device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LOCK = threading.Lock()


class DeviceSettings(Protocol):
    """What placement reads: the device and precision names the user set."""

    @property
    def device(self) -> str: ...

    @property
    def precision(self) -> str: ...


class DeviceError(RuntimeError):
    """The device or precision asked for is not available here."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    unet: torch.dtype
    text_encoder: torch.dtype
    vae: torch.dtype


def resolve_device(name: str) -> torch.device:
    """ "auto" or a device name -> a device this torch can use."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; "
                "install a CUDA build of torch or run with --cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {name}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def make_placement(device_name: str = "auto", precision: str = "auto") -> Placement:
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    device = resolve_device(device_name)
    if precision == "auto":
        if device.type == "cpu":
            return Placement(device, torch.float32, torch.float32, torch.float32)
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return Placement(device, torch.float16, torch.float16, torch.bfloat16 if bf16 else torch.float32)
    dtype = _DTYPES[precision]
    return Placement(device, dtype, dtype, torch.float32 if precision != "bf16" else torch.bfloat16)


_PLACEMENTS: dict[tuple[str, str], Placement] = {}


def placement(settings: DeviceSettings) -> Placement:
    """The placement for these settings, resolved once per (device, precision) in this process."""
    key = (settings.device, settings.precision)
    with _LOCK:
        found = _PLACEMENTS.get(key)
    if found is None:
        found = make_placement(*key)
        with _LOCK:
            _PLACEMENTS[key] = found
    return found


def place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a (shared) module's weights to `device` in `dtype`, once; returns the module.

    The parameter objects stay the same (`Module.to` swaps their data), so the LoRA patcher's
    state for the module stays valid; weights already patched move with their patches.
    """
    first = next(module.parameters(), None)
    if first is None or (first.device == device and first.dtype == dtype):
        return module
    with _LOCK, torch.inference_mode(False), torch.no_grad():
        first = next(module.parameters())
        if first.device != device or first.dtype != dtype:
            # torch's own `to`: diffusers' override warns about casting, which is what we mean to do
            torch.nn.Module.to(module, device=device, dtype=dtype)
    return module


def where(module: Any) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) a module computes in: those of its first parameter (CPU fp32 if none)."""
    first = next(module.parameters(), None)
    if first is None:
        return torch.device("cpu"), torch.float32
    return first.device, first.dtype


def on_device(settings: DeviceSettings, module: Any, part: str) -> Any:
    """`module` placed where the settings' placement puts its `part` ("unet", "text_encoder", "vae")."""
    where_to = placement(settings)
    return place(module, where_to.device, getattr(where_to, part))
