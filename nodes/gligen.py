"""Nodes: GLIGENLoader and GLIGENTextBoxApply (ComfyUI nodes.py), with ComfyUI's ids and inputs.

GLIGENLoader reads a GLIGEN file from models/gligen (shared: one copy per file version).
GLIGENTextBoxApply encodes its text with the CLIP (the pooled output, unprojected) and appends the box
`(pooled, height // 8, width // 8, y // 8, x // 8)` to the `gligen` option of every entry,
`("position", model, boxes)`, as ComfyUI does; the sampler runs it (nodes/sd/gligen.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from nodegraph.node import MAX_RESOLUTION, FileChoice, Int, Node, Output, RunContext, Socket, String
from nodegraph.primitives import LruCache, file_stamp
from nodegraph.types import CLIP, CONDITIONING, GLIGEN
from nodes.conditioning import embedding_lookup
from nodes.sd.device import on_device
from nodes.sd.gligen import POSITION, GligenModel, load_gligen
from nodes.sd.handles import ClipHandle
from nodes.sd.prompt import tokenize
from nodes.sd.safetensors_file import CheckpointError
from nodes.sd.text_encoder import encode_prompt
from nodes.sd.text_encoder_sdxl import is_sdxl_clip
from nodes.sd.values import Conditioning, CondOptions


class GligenStore:
    """Loaded GLIGEN models by (path, mtime_ns, size): one copy per file, the least recent dropped first."""

    def __init__(self, capacity: int = 2) -> None:
        self._entries: LruCache[tuple[str, int, int], GligenModel] = LruCache(max_entries=capacity)
        self._lock = threading.Lock()

    @classmethod
    def create(cls, env: Any) -> GligenStore:
        """Factory for `env.service`."""
        return cls()

    def get(self, path: Path, name: str) -> GligenModel:
        """The model in `path` (loaded once per file version); `name` is what messages call it."""
        resolved = Path(os.path.realpath(path))
        key = (str(resolved), *file_stamp(resolved))
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                found = load_gligen(resolved, name)
                self._entries.put(key, found)
            return found


class GLIGENLoader(Node):
    """Load a GLIGEN model (models/gligen) to place objects in text boxes with GLIGENTextBoxApply."""

    CATEGORY = "loaders"
    INPUTS = (FileChoice("gligen_name", folder="gligen"),)
    OUTPUTS = (Output(GLIGEN),)

    def run(self, ctx: RunContext, gligen_name: str) -> tuple[GligenModel]:
        path = ctx.env.folders.resolve("gligen", gligen_name)
        try:
            return (ctx.env.service(GligenStore, GligenStore.create).get(path, gligen_name),)
        except CheckpointError as exc:  # not a GLIGEN file, an incomplete or unreadable one
            raise ValueError(f"GLIGENLoader: gligen_name: {exc}") from exc


class GLIGENTextBoxApply(Node):
    """Ask for what the text describes inside a box of the image (GLIGEN; x, y, width, height in pixels)."""

    CATEGORY = "conditioning/gligen"
    INPUTS = (
        Socket("conditioning_to", CONDITIONING),
        Socket("clip", CLIP),
        Socket("gligen_textbox_model", GLIGEN),
        String("text", multiline=True, dynamic_prompts=True),
        Int("width", 64, min=8, max=MAX_RESOLUTION, step=8),
        Int("height", 64, min=8, max=MAX_RESOLUTION, step=8),
        Int("x", 0, min=0, max=MAX_RESOLUTION, step=8),
        Int("y", 0, min=0, max=MAX_RESOLUTION, step=8),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self,
        ctx: RunContext,
        conditioning_to: Conditioning,
        clip: ClipHandle,
        gligen_textbox_model: GligenModel,
        text: str,
        width: int,
        height: int,
        x: int,
        y: int,
    ) -> tuple[Conditioning]:
        if not isinstance(gligen_textbox_model, GligenModel):
            raise ValueError(
                "GLIGENTextBoxApply: input gligen_textbox_model needs a GLIGEN from GLIGENLoader"
            )
        if not isinstance(clip, ClipHandle):
            raise ValueError("GLIGENTextBoxApply: input clip needs a CLIP from a checkpoint loader")
        if is_sdxl_clip(clip):
            raise ValueError(
                f"GLIGENTextBoxApply: clip is an SDXL CLIP ('{clip.source}'); GLIGEN models are made for "
                "SD1.x: use the CLIP of an SD1.x checkpoint"
            )
        tokenized = tokenize(text, clip.tokenizer, embedding_lookup(ctx, clip))
        for name in tokenized.missing_embeddings:
            ctx.warn(f"embedding:{name} does not exist, ignoring", {"embedding": name})
        on_device(ctx.env, clip.text_encoder, "text_encoder")
        _, pooled = encode_prompt(clip, tokenized, warn=ctx.warn)  # the unprojected pooled output
        reads = gligen_textbox_model.in_dim
        if pooled.shape[-1] != reads:
            raise ValueError(
                f"GLIGENTextBoxApply: the CLIP of '{clip.source}' is {pooled.shape[-1]} wide, GLIGEN "
                f"'{gligen_textbox_model.name}' reads {reads}-wide text; use an SD1.x CLIP"
            )
        box = (pooled, height // 8, width // 8, y // 8, x // 8)
        out: Conditioning = []
        for item in conditioning_to if isinstance(conditioning_to, (list, tuple)) else [None]:
            if not isinstance(item, (list, tuple)) or not item:
                raise ValueError(
                    "GLIGENTextBoxApply: conditioning_to: an entry is not [embedding, options]; "
                    "connect a CLIPTextEncode output"
                )
            options: CondOptions = item[1].copy() if len(item) > 1 and isinstance(item[1], dict) else {}
            previous = options.get("gligen")
            boxes = list(previous[2]) if isinstance(previous, (list, tuple)) and len(previous) == 3 else []
            options["gligen"] = (POSITION, gligen_textbox_model, [*boxes, box])
            out.append((item[0], options))
        return (out,)


NODES: tuple[type[Node], ...] = (GLIGENLoader, GLIGENTextBoxApply)
