"""Control LoRAs (Stability's `control-lora-*-rank128/256` files, ComfyUI's ControlLoraSave): a
ControlNet stored as what it adds to the UNet it steers, built against the model being sampled.

Source: comfy/controlnet.py `ControlLora.pre_run` and `ControlLoraOps`. At the start of every
sampling ComfyUI builds a ControlNet with the sampled model's UNet config, gives it the UNet's weights
as they are at that moment (LoRAs merged) and then the file's tensors: a full tensor replaces the
weight of its name, and a `<module>.up` / `<module>.down` pair makes the module's weight
`W + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)` (no alpha, in the model's dtype). Hint
encoder, zero convs and the middle-block output conv are full tensors.

Here the same network is built once per sampling, inside the sampler's LoRA patch context, by the
loader of an original-layout ControlNet file (`controlnet_config`, `controlnet_key_map`,
`build_controlnet`) run on a virtual file: the UNet's encoder half under its LDM names
(`keymap.diffusers_to_ldm`) with the control LoRA's tensors applied. Every tensor of the file must
name a weight of that network, or the file is refused naming it.
"""

from __future__ import annotations

from typing import Any

import torch

from nodes.sd.controlnet import (
    ControlModel,
    ControlNetError,
    build_controlnet,
    controlnet_config,
    controlnet_key_map,
)
from nodes.sd.convert import UnsupportedCheckpointError
from nodes.sd.lora.keymap import diffusers_to_ldm, module_params

ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")  # what a ControlNet copies
OWN = ("zero_convs.", "input_hint_block.", "middle_block_out.")  # what only a ControlNet has
UP, DOWN = ".up", ".down"


class _Virtual:
    """The ControlNet file a control LoRA stands for on `unet`: LDM names, tensors made on request."""

    def __init__(self, model: ControlModel, unet: Any) -> None:
        assert model.lora is not None
        self.name = model.name
        self.params: dict[str, torch.Tensor] = dict(unet.named_parameters())
        self.base: dict[str, str] = {}  # LDM key of the UNet's encoder half -> UNet parameter name
        for path, names in module_params(unet):
            ldm = diffusers_to_ldm(path, unet.config)
            if ldm is not None and ldm.startswith(ENCODER):
                self.base |= {f"{ldm}.{p}": f"{path}.{p}" for p in names}
        tensors = model.lora.tensors
        self.full = {k: t for k, t in tensors.items() if not k.endswith((UP, DOWN))}
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in tensors:
            if key.endswith((UP, DOWN)):
                stem = key.rsplit(".", 1)[0]
                if stem + UP not in tensors or stem + DOWN not in tensors:
                    raise ControlNetError(f"'{self.name}': {key} has no up/down twin: a broken control LoRA")
                self.pairs[stem + ".weight"] = (tensors[stem + UP], tensors[stem + DOWN])
        strange = [k for k in [*self.full, *self.pairs] if k not in self.base and not k.startswith(OWN)]
        if strange:
            raise ControlNetError(
                f"control LoRA '{self.name}' names {', '.join(sorted(strange)[:3])}, which this model's UNet "
                "does not have: it was made for another model"
            )

    def keys(self) -> list[str]:
        return sorted(set(self.base) | set(self.full))

    def shape(self, key: str) -> tuple[int, ...]:
        found = self.full.get(key)
        return tuple(found.shape if found is not None else self.params[self.base[key]].shape)

    def get(self, key: str) -> torch.Tensor:
        found = self.full.get(key)
        if found is not None:
            return found
        weight = self.params[self.base[key]].detach()
        pair = self.pairs.get(key)
        if pair is None:
            return weight  # shared with the UNet, as ComfyUI's set_attr_param shares it
        up, down = (t.to(weight.device, torch.float32) for t in pair)
        rank_ok = up.dim() >= 2 and down.dim() >= 2 and up.flatten(1).shape[1] == down.shape[0]
        if not rank_ok or up.shape[0] * down[0].numel() != weight.numel():
            raise ControlNetError(
                f"'{self.name}': {key[: -len('.weight')]}'s up/down ({tuple(up.shape)}, {tuple(down.shape)}) "
                f"do not make the UNet's {tuple(weight.shape)} weight: the control LoRA is for another model"
            )
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        return (weight.float() + delta).to(weight.dtype)


def build_control_lora(model: ControlModel, unet: Any) -> Any:
    """The diffusers ControlNet a control LoRA makes on `unet` (its weights as they are now), on the
    UNet's device and in its dtype."""
    first = next(unet.parameters())
    with torch.inference_mode(False), torch.no_grad():
        source = _Virtual(model, unet)
        try:
            config = controlnet_config(source, model.name)
        except (UnsupportedCheckpointError, KeyError) as exc:
            raise ControlNetError(f"control LoRA '{model.name}' does not fit this model ({exc})") from exc
        net = build_controlnet(model.name, config, controlnet_key_map(source, config), source).net
        return net.to(first.device, first.dtype)
