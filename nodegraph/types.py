"""Socket types: the names ComfyUI uses on the wire, as typed constants.

A socket type is a name; two sockets connect when their names are equal. There is no wildcard
and no comma-joined union (ComfyUI's `"*"` and `"FLOAT,INT"` are the lesson).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SocketType:
    """A named value type that flows along links between nodes."""

    name: str

    def __str__(self) -> str:
        return self.name


MODEL = SocketType("MODEL")
CLIP = SocketType("CLIP")
VAE = SocketType("VAE")
CONDITIONING = SocketType("CONDITIONING")
LATENT = SocketType("LATENT")
IMAGE = SocketType("IMAGE")
MASK = SocketType("MASK")
UPSCALE_MODEL = SocketType("UPSCALE_MODEL")
# Custom sampling's pieces (comfy_extras/nodes_custom_sampler.py) and ControlNet
SIGMAS = SocketType("SIGMAS")
SAMPLER = SocketType("SAMPLER")
GUIDER = SocketType("GUIDER")
NOISE = SocketType("NOISE")
CONTROL_NET = SocketType("CONTROL_NET")
# CLIP vision (CLIPVisionLoader, CLIPVisionEncode, unCLIPConditioning)
CLIP_VISION = SocketType("CLIP_VISION")
CLIP_VISION_OUTPUT = SocketType("CLIP_VISION_OUTPUT")
# GLIGEN text boxes (GLIGENLoader, GLIGENTextBoxApply)
GLIGEN = SocketType("GLIGEN")
# The custom-node packs' LoRA list (Efficiency Nodes, Comfyroll): (name, strength_model, strength_clip)
LORA_STACK = SocketType("LORA_STACK")

# Widget types: values that are usually typed into the node, but may also arrive by link.
INT = SocketType("INT")
FLOAT = SocketType("FLOAT")
STRING = SocketType("STRING")
BOOLEAN = SocketType("BOOLEAN")
COMBO = SocketType("COMBO")

WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

# Hidden inputs the executor fills in (ComfyUI's names).
PROMPT = "PROMPT"
EXTRA_PNGINFO = "EXTRA_PNGINFO"
UNIQUE_ID = "UNIQUE_ID"
HIDDEN_KINDS = frozenset({PROMPT, EXTRA_PNGINFO, UNIQUE_ID})
