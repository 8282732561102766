"""Nodes: CLIPTextEncode, CLIPSetLastLayer, ConditioningCombine, ConditioningZeroOut.

A CONDITIONING value is ComfyUI's: a list of `[cond [1, 77k, 768], {"pooled_output": [1, 768]}]`
entries (SDXL: `[1, 77k, 2048]` and bigG's `[1, 1280]`, see nodes/sd/text_encoder_sdxl.py).
Lists are never mutated in place; each node builds new ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from nodegraph.node import Int, Node, Output, RunContext, Socket, String
from nodegraph.types import CLIP, CONDITIONING
from nodes.sd.device import on_device, place
from nodes.sd.embeddings import EmbeddingError, find_embedding_file, load_embedding
from nodes.sd.handles import ClipHandle
from nodes.sd.prompt import EmbeddingLookup, tokenize
from nodes.sd.text_encoder import encode_prompt
from nodes.sd.text_encoder_sdxl import encode_sdxl, is_sdxl_clip, tokenize_sdxl
from nodes.sd.values import Conditioning, ConditioningEntry, CondOptions


class CLIPTextEncode(Node):
    """Encodes a text prompt using a CLIP model into an embedding that can be used to guide the diffusion model towards generating specific images."""  # noqa: E501

    DISPLAY_NAME = "CLIP Text Encode (Prompt)"
    CATEGORY = "conditioning"
    INPUTS = (
        String("text", multiline=True, dynamic_prompts=True, tooltip="The text to be encoded."),
        Socket("clip", socket_type=CLIP, tooltip="The CLIP model used for encoding the text."),
    )
    OUTPUTS = (
        Output(
            CONDITIONING,
            tooltip="A conditioning containing the embedded text used to guide the diffusion model.",
        ),
    )

    def run(self, ctx: RunContext, text: str, clip: ClipHandle) -> tuple[Conditioning]:
        if clip is None:
            raise ValueError(
                "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your "
                "checkpoint does not contain a valid clip or text encoder model."
            )

        if is_sdxl_clip(clip):
            return ([encode_sdxl_entry(ctx, clip, text)],)
        tokenized = tokenize(text, clip.tokenizer, embedding_lookup(ctx, clip))
        for name in tokenized.missing_embeddings:
            ctx.warn(f"embedding:{name} does not exist, ignoring", {"embedding": name})
        place_text_encoder(ctx, clip, clip.text_encoder)
        cond, pooled = encode_prompt(clip, tokenized, warn=ctx.warn)
        return ([(cond, {"pooled_output": pooled})],)


def place_text_encoder(ctx: RunContext, clip: ClipHandle, module: Any) -> None:
    """Where the settings put text encoders, or the CPU in fp32 for a CLIP loaded with device "cpu"
    (CLIPLoader's and DualCLIPLoader's option: ComfyUI's load and offload device both the CPU)."""
    if clip.extra.get("device") == "cpu":
        place(module, torch.device("cpu"), torch.float32)
    else:
        on_device(ctx.env, module, "text_encoder")


def embedding_lookup(ctx: RunContext, clip: ClipHandle, embed_key: str = "clip_l") -> EmbeddingLookup:
    """`embedding:name` -> vectors for one encoder (`clip_l` / `clip_g` of SDXL files); warns on bad files."""

    def lookup(name: str) -> Any:
        path = find_embedding_file(name, clip.embedding_dirs)
        if path is None:
            return None
        try:
            return load_embedding(path, embed_key)
        except EmbeddingError as exc:
            ctx.warn(str(exc), {"embedding": name})
            return None

    return lookup


def encode_sdxl_entry(
    ctx: RunContext,
    clip: ClipHandle,
    text_g: str,
    text_l: str | None = None,
    options: CondOptions | None = None,
) -> ConditioningEntry:
    """One SDXL conditioning entry `(cond, {"pooled_output": ..., **options})` (both encoders)."""
    tokens = tokenize_sdxl(clip, text_g, text_l, lambda key: embedding_lookup(ctx, clip, key))
    missing = tokens.g.missing_embeddings + (tokens.l.missing_embeddings if tokens.l else [])
    for name in dict.fromkeys(missing):
        ctx.warn(f"embedding:{name} does not exist, ignoring", {"embedding": name})
    for module in (clip.text_encoder, clip.text_encoder_2):
        if module is not None:
            place_text_encoder(ctx, clip, module)
    cond, pooled = encode_sdxl(clip, tokens, warn=ctx.warn)
    return (cond, {"pooled_output": pooled, **(options or {})})


class CLIPSetLastLayer(Node):
    """Use the output of an earlier CLIP layer ("CLIP skip": -2 skips the last layer)."""

    DISPLAY_NAME = "CLIP Set Last Layer"
    CATEGORY = "conditioning"
    INPUTS = (Socket("clip", socket_type=CLIP), Int("stop_at_clip_layer", -1, min=-24, max=-1, step=1))
    OUTPUTS = (Output(CLIP),)

    def run(self, ctx: RunContext, clip: ClipHandle, stop_at_clip_layer: int) -> tuple[ClipHandle]:
        return (replace(clip, layer_idx=stop_at_clip_layer),)


class ConditioningCombine(Node):
    """Combine two conditionings: each guides the model separately and the predictions are averaged."""

    DISPLAY_NAME = "Conditioning (Combine)"
    CATEGORY = "conditioning"
    INPUTS = (
        Socket("conditioning_1", socket_type=CONDITIONING),
        Socket("conditioning_2", socket_type=CONDITIONING),
    )
    OUTPUTS = (Output(CONDITIONING),)

    def run(
        self, ctx: RunContext, conditioning_1: Conditioning, conditioning_2: Conditioning
    ) -> tuple[Conditioning]:
        return (list(conditioning_1) + list(conditioning_2),)


class ConditioningZeroOut(Node):
    """Replace the embeddings and pooled output of a conditioning with zeros."""

    DISPLAY_NAME = "ConditioningZeroOut"
    CATEGORY = "advanced/conditioning"
    INPUTS = (Socket("conditioning", socket_type=CONDITIONING),)
    OUTPUTS = (Output(CONDITIONING),)

    def run(self, ctx: RunContext, conditioning: Conditioning) -> tuple[Conditioning]:
        out: Conditioning = []
        for cond, extras in conditioning:
            options = extras.copy()
            pooled = options.get("pooled_output")
            if pooled is not None:
                options["pooled_output"] = torch.zeros_like(pooled)
            out.append((torch.zeros_like(cond), options))
        return (out,)


NODES: tuple[type[Node], ...] = (CLIPTextEncode, CLIPSetLastLayer, ConditioningCombine, ConditioningZeroOut)
