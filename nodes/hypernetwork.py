"""Node: HypernetworkLoader (comfy_extras/nodes_hypernetwork.py), with ComfyUI's id and inputs.

The MODEL it returns carries one more `HypernetworkRef` (file, stamp, strength); the sampler
applies the stack to the UNet's attentions while it samples (nodes/sd/hypernetwork.py).
"""

from __future__ import annotations

from dataclasses import replace

from nodegraph.node import FileChoice, Float, Node, Output, RunContext, Socket
from nodegraph.primitives import file_stamp
from nodegraph.types import MODEL
from nodes.sd.handles import ModelHandle
from nodes.sd.hypernetwork import HypernetworkRef, unknown_activation


class HypernetworkLoader(Node):
    """Apply an A1111 hypernetwork (.pt in models/hypernetworks) to the model's attention layers."""

    CATEGORY = "loaders"
    INPUTS = (
        Socket("model", MODEL),
        FileChoice("hypernetwork_name", folder="hypernetworks"),
        Float("strength", 1.0, min=-10.0, max=10.0, step=0.01),
    )
    OUTPUTS = (Output(MODEL),)

    def run(
        self, ctx: RunContext, model: ModelHandle, hypernetwork_name: str, strength: float
    ) -> tuple[ModelHandle]:
        if not isinstance(model, ModelHandle):
            raise ValueError("model: expected a MODEL from a checkpoint loader")
        path = ctx.env.folders.resolve("hypernetworks", hypernetwork_name)
        activation = unknown_activation(path)  # also reads the file: a broken one fails here
        if activation is not None:  # ComfyUI logs it and returns the model unchanged
            ctx.warn(
                f"hypernetwork '{hypernetwork_name}' uses the activation {activation!r}, which ComfyUI does "
                "not support; the model is used without it"
            )
            return (model,)
        ref = HypernetworkRef(path, file_stamp(path), strength, hypernetwork_name)
        return (replace(model, hypernetworks=model.hypernetworks + (ref,)),)


NODES: tuple[type[Node], ...] = (HypernetworkLoader,)
