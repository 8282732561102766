"""Nodes: ControlNet loading and applying (nodes.py ControlNetLoader, DiffControlNetLoader,
ControlNetApply, ControlNetApplyAdvanced), with ComfyUI's ids, inputs and conditioning options.
T2I-Adapters load through the same loaders and apply through the same nodes, as in ComfyUI.

The loaded network is shared (a store keyed by file and stamp, like checkpoints); applying one
returns new conditioning entries whose `control` option is an immutable `nodes.sd.control.Control`
chained to the entry's previous one. The sampler runs it (nodes/sd/guidance.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch

from nodegraph.env import Environment
from nodegraph.node import FileChoice, Float, Node, Output, RunContext, Socket
from nodegraph.primitives import LruCache, file_stamp
from nodegraph.types import CONDITIONING, CONTROL_NET, IMAGE, MODEL, VAE
from nodes.sd.control import Control
from nodes.sd.controlnet import ControlModel, load_controlnet
from nodes.sd.handles import ModelHandle, VaeHandle
from nodes.sd.values import Conditioning, CondOptions

CATEGORY = "conditioning/controlnet"


class ControlNetStore:
    """Loaded ControlNets by (path, mtime_ns, size): one copy per file, the least recent dropped first."""

    def __init__(self, capacity: int = 4) -> None:
        self._entries: LruCache[tuple[str, int, int], ControlModel] = LruCache(max_entries=capacity)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, env: Any) -> ControlNetStore:
        """Factory for `env.service`."""
        return cls()

    def get(self, path: Path) -> ControlModel:
        resolved = Path(os.path.realpath(path))
        key = (str(resolved), *file_stamp(resolved))
        with self._lock:  # loads are rare and small next to a checkpoint: one at a time
            found = self._entries.get(key)
            if found is None:
                found = load_controlnet(resolved)
                self._entries.put(key, found)
            return found


def _store(env: Environment) -> ControlNetStore:
    return env.service(ControlNetStore, ControlNetStore.create)


def _strength() -> Float:
    return Float("strength", 1.0, min=0.0, max=10.0, step=0.01)


def _percent(name: str, default: float) -> Float:
    return Float(name, default, min=0.0, max=1.0, step=0.001)


def _hint(image: Any) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError("image: expected an IMAGE [batch, height, width, channels] as the ControlNet hint")
    return image[..., :3].movedim(-1, 1)  # [B,3,H,W] in [0,1], not rescaled (ComfyUI's control_hint)


def _check_net(control_net: Any) -> ControlModel:
    if not isinstance(control_net, ControlModel):
        raise ValueError("control_net: expected a CONTROL_NET from a ControlNet loader")
    return control_net


class ControlNetLoader(Node):
    """Load a ControlNet or T2I-Adapter (models/controlnet, models/t2i_adapter, A1111's models/ControlNet)
    to steer sampling with a hint."""

    DISPLAY_NAME = "Load ControlNet Model"
    CATEGORY = "loaders"
    INPUTS = (FileChoice("control_net_name", folder="controlnet"),)
    OUTPUTS = (Output(CONTROL_NET),)

    def run(self, ctx: RunContext, control_net_name: str) -> tuple[ControlModel]:
        return (_store(ctx.env).get(ctx.env.folders.resolve("controlnet", control_net_name)),)


class DiffControlNetLoader(Node):
    """Load a diff ControlNet: its weights are added to the model's UNet weights."""

    DISPLAY_NAME = "Load ControlNet Model (diff)"
    CATEGORY = "loaders"
    INPUTS = (Socket("model", MODEL), FileChoice("control_net_name", folder="controlnet"))
    OUTPUTS = (Output(CONTROL_NET),)

    def run(self, ctx: RunContext, model: ModelHandle, control_net_name: str) -> tuple[ControlModel]:
        if not isinstance(model, ModelHandle):
            raise ValueError("model: expected a MODEL from a checkpoint loader")
        path = ctx.env.folders.resolve("controlnet", control_net_name)
        return (load_controlnet(path, base_unet=model.unet),)  # depends on the model: not shared


class ControlNetApply(Node):
    """Apply a ControlNet to a conditioning (and, at sampling, to the negative too). Deprecated in
    ComfyUI for Apply ControlNet, which takes both sides and a step range."""

    DISPLAY_NAME = "Apply ControlNet (OLD)"
    CATEGORY = CATEGORY
    DEPRECATED = True
    INPUTS = (
        Socket("conditioning", CONDITIONING),
        Socket("control_net", CONTROL_NET),
        Socket("image", IMAGE),
        _strength(),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        conditioning: Conditioning,
        control_net: ControlModel,
        image: torch.Tensor,
        strength: float,
    ) -> tuple[Conditioning]:
        if strength == 0:
            return (conditioning,)
        net, hint = _check_net(control_net), _hint(image)
        out: Conditioning = []
        for item in _entries(conditioning, "conditioning"):
            opts = item[1].copy()
            # one new control per entry (ComfyUI copies the net per entry), chained to the entry's own
            opts["control"] = Control(net, hint, strength, previous=_previous(opts, "conditioning"))
            opts["control_apply_to_uncond"] = True
            out.append((item[0], opts))
        return (out,)


class ControlNetApplyAdvanced(Node):
    """Apply a ControlNet to the positive and negative conditioning, between two points of the sampling."""

    DISPLAY_NAME = "Apply ControlNet"
    CATEGORY = CATEGORY
    INPUTS = (
        Socket("positive", CONDITIONING),
        Socket("negative", CONDITIONING),
        Socket("control_net", CONTROL_NET),
        Socket("image", IMAGE),
        _strength(),
        _percent("start_percent", 0.0),
        _percent("end_percent", 1.0),
        Socket("vae", VAE, optional=True),
    )
    OUTPUTS = (Output(CONDITIONING, name="positive"), Output(CONDITIONING, name="negative"))

    def run(
        self,
        ctx: RunContext,
        positive: Conditioning,
        negative: Conditioning,
        control_net: ControlModel,
        image: torch.Tensor,
        strength: float,
        start_percent: float,
        end_percent: float,
        vae: VaeHandle | None = None,
    ) -> tuple[Conditioning, Conditioning]:
        # The VAE is for ControlNets that take a latent hint (SD3/Flux families); SD1.x/SDXL ones ignore it.
        if strength == 0:
            return (positive, negative)
        net, hint = _check_net(control_net), _hint(image)
        made: dict[int, Control] = {}  # previous control (by identity) -> its successor, shared by both sides
        sides = []
        for label, conditioning in (("positive", positive), ("negative", negative)):
            side: Conditioning = []
            for item in _entries(conditioning, label):
                opts = item[1].copy()
                previous = _previous(opts, label)
                key = id(previous)
                if key not in made:
                    made[key] = Control(net, hint, strength, start_percent, end_percent, previous)
                opts["control"] = made[key]
                opts["control_apply_to_uncond"] = False
                side.append((item[0], opts))
            sides.append(side)
        return (sides[0], sides[1])


def _entries(conditioning: Any, label: str) -> Conditioning:
    if not isinstance(conditioning, (list, tuple)) or not all(
        isinstance(i, (list, tuple)) and len(i) >= 2 and isinstance(i[1], dict) for i in conditioning
    ):
        raise ValueError(f"{label}: expected CONDITIONING (a list of [embedding, options])")
    return list(conditioning)


def _previous(opts: CondOptions, label: str) -> Control | None:
    previous = opts.get("control")
    if previous is not None and not isinstance(previous, Control):
        raise ValueError(f"{label}: its 'control' option is not a ControlNet this engine made")
    return previous


NODES: tuple[type[Node], ...] = (
    ControlNetLoader,
    DiffControlNetLoader,
    ControlNetApply,
    ControlNetApplyAdvanced,
)
