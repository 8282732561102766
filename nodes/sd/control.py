"""The CONTROL value a conditioning entry carries, and what it gives the UNet at one model call.

Sources: comfy/controlnet.py (`ControlBase`, `ControlNet.get_control`, `T2IAdapter.get_control`,
`control_merge`, `broadcast_image_to`), nodes.py (`ControlNetApply`, `ControlNetApplyAdvanced`) and
comfy/ldm/modules/diffusionmodules/openaimodel.py (`apply_control`).

* A `Control` is immutable: the loaded network, the hint image `[B,3,H,W]` in [0,1] (not rescaled),
  strength, start/end percent and the ControlNet applied before it on the same entry (a chain).
* At a model call the hint is resized to 8x the latent (nearest-exact, centre crop) when it is
  not already, and repeated to the batch; the network sees the UNet's own inputs (the scaled x,
  the discrete timestep, each row's context, SDXL's added conditioning).
* Every residual is multiplied by the strength; a chained ControlNet's residuals are added to its
  predecessor's; one outside its sigma range (sigma_end <= sigma <= sigma_start, inclusive, with the
  percent sigmas of the fp32 table) passes its predecessor's on unchanged.
* The UNet adds `middle` after its middle block and residual i to skip connection i (diffusers'
  `down_block_additional_residuals` / `mid_block_additional_residual`: the same places).
* A T2I-Adapter in the chain runs once per sampling and hint size (the sampler caches its features)
  on the hint resized to 8x the latent rounded up to its pixel unshuffle; its features, times the
  strength, join the chain as ComfyUI's "input" entries (added after input blocks, see
  nodes/sd/t2i_adapter.py `features_added`) and, for SDXL adapters, a "middle" one. Merging follows
  `control_merge`: per key and index, previous + this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nodes.sd.controlnet import ControlModel
from nodes.sd.device import place
from nodes.sd.latent_ops import common_upscale
from nodes.sd.t2i_adapter import Features, hint_size

PercentToSigma = Callable[[float], float]
NetFor = Callable[[ControlModel], Any]  # the network to run for a loaded ControlNet (control LoRAs: built)
FeaturesFor = Callable[["Control", torch.Tensor, int], Features]  # a T2I-Adapter's (control, x, batched)
KEYS = ("input", "middle", "output")  # ComfyUI's control dict
HINT_SCALE = 8  # the hint is in pixels: 8x the latent (ControlBase.compression_ratio)


@dataclass(frozen=True, eq=False)
class Control:
    """One applied ControlNet (ComfyUI's `control` conditioning option); identity matters for batching."""

    model: ControlModel
    hint: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: Control | None = None

    def chain(self) -> list[Control]:
        """This control and its predecessors, first applied first."""
        out: list[Control] = []
        node: Control | None = self
        while node is not None:
            out.append(node)
            node = node.previous
        return out[::-1]


def has_control_lora(*values: Any) -> bool:
    """Whether any CONDITIONING among `values` (or held by a guide among them, one level down) steers
    with a control LoRA: the sampler then needs the UNet's LoRAs fused into its weights (no runtime
    branches), since the control LoRA is built from those weights."""
    for value in values:
        if dataclasses.is_dataclass(value) and not isinstance(value, (type, Control)):
            if has_control_lora(*(getattr(value, f.name) for f in dataclasses.fields(value))):
                return True
        elif isinstance(value, (list, tuple)):
            for item in value:
                opts = item[1] if isinstance(item, (list, tuple)) and len(item) > 1 else None
                control = opts.get("control") if isinstance(opts, dict) else None
                if isinstance(control, Control) and any(n.model.lora is not None for n in control.chain()):
                    return True
    return False


def broadcast_image_to(hint: torch.Tensor, batch: int, batched_number: int) -> torch.Tensor:
    """comfy.controlnet.broadcast_image_to: a hint batch spread over the rows of each batched entry."""
    if hint.shape[0] == 1:
        return hint
    per_batch = batch // batched_number
    hint = hint[:per_batch]
    if per_batch > hint.shape[0]:
        hint = torch.cat([hint] * (per_batch // hint.shape[0]) + [hint[: per_batch % hint.shape[0]]])
    if hint.shape[0] == batch:
        return hint
    return torch.cat([hint] * batched_number)


def _hint_for(control: Control, x: torch.Tensor, batched_number: int, dtype: torch.dtype) -> torch.Tensor:
    hint = control.hint
    height, width = x.shape[2] * HINT_SCALE, x.shape[3] * HINT_SCALE
    if tuple(hint.shape[2:]) != (height, width):
        hint = common_upscale(hint.float(), width, height, "nearest-exact", "center")
    hint = hint.to(x.device, dtype)
    if hint.shape[0] != x.shape[0]:
        hint = broadcast_image_to(hint, x.shape[0], batched_number)
    return hint


def adapter_features(control: Control, x: torch.Tensor, batched_number: int) -> Features:
    """T2IAdapter.get_control: the hint resized (nearest-exact, centre crop) to 8x the latent rounded up
    to the adapter's unshuffle, made grey (the channel mean) for a 1-channel adapter, spread over the
    batch, and the adapter run on it in float32 (ComfyUI runs it in the dtype of the sampler's x)."""
    spec = control.model.adapter
    assert spec is not None
    height, width = hint_size(spec, x.shape[2], x.shape[3])
    hint = control.hint.float()
    if tuple(hint.shape[2:]) != (height, width):
        hint = common_upscale(hint, width, height, "nearest-exact", "center")
    hint = hint.to(x.device)
    if spec.hint_channels == 1 and hint.shape[1] > 1:
        hint = torch.mean(hint, 1, keepdim=True)
    if hint.shape[0] != x.shape[0]:
        hint = broadcast_image_to(hint, x.shape[0], batched_number)
    net = place(control.model.net, x.device, torch.float32)
    features: Features = net(hint)
    return features


def _merge(own: Features, previous: Features | None) -> Features:
    """ControlBase.control_merge: per key and index, the previous entry plus this one's (either alone
    where the other is None or missing)."""
    out = {key: list(own.get(key, [])) for key in KEYS}
    for key in KEYS:
        mine = out[key]
        for i, prev in enumerate(previous.get(key, []) if previous is not None else []):
            if i >= len(mine):
                mine.append(prev)
            elif prev is not None:
                current = mine[i]
                mine[i] = prev if current is None else prev + current
    return out


def _scaled(features: Features, strength: float) -> Features:
    return {key: [None if f is None else f * strength for f in found] for key, found in features.items()}


def residuals(
    control: Control,
    x_in: torch.Tensor,
    timestep: torch.Tensor,
    sigma: float,
    context: torch.Tensor,
    added: dict[str, torch.Tensor] | None,
    batched_number: int,
    percent_to_sigma: PercentToSigma,
    net_for: NetFor | None = None,
    features_for: FeaturesFor | None = None,
) -> Features | None:
    """The chain's control for one model call (x_in already scaled by 1/sqrt(sigma^2+1)) in ComfyUI's
    terms: "output" (ControlNets' residuals, one per skip connection), "middle" (ControlNets' and SDXL
    adapters'), "input" (T2I-Adapters' features, see nodes/sd/t2i_adapter.py); None if no member of the
    chain is active at `sigma`. `net_for` gives the network of each ControlNet (the sampler's builds
    control LoRAs on its UNet; default its own `net`), `features_for` an adapter's features (the
    sampler's computes them once per sampling; default `adapter_features`)."""
    out: Features | None = None
    for node in control.chain():
        if not percent_to_sigma(node.end_percent) <= sigma <= percent_to_sigma(node.start_percent):
            continue
        if node.model.adapter is not None:
            found = (features_for or adapter_features)(node, x_in, batched_number)
            out = _merge(_scaled(found, node.strength), out)
            continue
        net = node.model.net if net_for is None else net_for(node.model)
        first = next(net.parameters())
        if first.device != x_in.device or first.dtype != x_in.dtype:
            place(net, x_in.device, x_in.dtype)
        down, mid = net(
            x_in,
            timestep,
            encoder_hidden_states=context,
            controlnet_cond=_hint_for(node, x_in, batched_number, x_in.dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )
        own: Features = {"output": list(down), "middle": [mid]}
        out = _merge(_scaled(own, node.strength), out)
    return out
