"""SDXL text encoding with ComfyUI's conventions (`comfy/sdxl_clip.py`, `comfy/sd1_clip.py`).

1. The text is tokenised twice with the same BPE: "l" for CLIP-L (padded with the end token) and
   "g" for OpenCLIP bigG (padded with 0); 77-token chunks and weights as for SD1.x, per encoder.
   `CLIPTextEncodeSDXL` gives each its own text and evens the chunk counts with empty-prompt chunks.
2. Each encoder returns its penultimate hidden state *without* the final LayerNorm (ComfyUI
   `layer_norm_hidden_state=False`); `CLIPSetLastLayer(n)` picks layer n on both, still un-normalised.
3. cond = cat([CLIP-L, bigG]) on the channel axis after cutting both to the shorter token length:
   `[1, 77k, 2048]`; the refiner has bigG alone: `[1, 77k, 1280]`.
4. The pooled output is bigG's: final-LN last layer at the first chunk's first end token, through
   `text_projection`; CLIP-L's pooled output and last layer never reach the output.
Each encoder runs inside `patched(...)`, the only place LoRA weights are applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nodes.sd.handles import ClipHandle
from nodes.sd.patcher import patched_clip
from nodes.sd.prompt import EmbeddingLookup, Tokenized, WeightedToken, tokenize
from nodes.sd.text_encoder import _first_end, run_clip, tower, weighted_chunks
from nodes.sd.tokenizer import CLIP_G_PAD, ClipTokenizer, PaddedTokenizer

Warn = Callable[[str], None]
SDXL_DEFAULT_LAYER = -2  # ComfyUI SDXLClipModel: layer "hidden" -2 / "penultimate"
SDXL_FAMILIES = ("sdxl", "sdxl_refiner")


class SdxlClipError(ValueError):
    """A CLIP handle that cannot do what an SDXL node asks (a refiner CLIP without CLIP-L ...)."""


@dataclass
class SdxlTokens:
    """Tokens per encoder: "l" is None for the refiner (bigG alone)."""

    g: Tokenized
    l: Tokenized | None  # noqa: E741 - ComfyUI's own key name


def is_sdxl_clip(clip: ClipHandle) -> bool:
    return clip.family in SDXL_FAMILIES or clip.text_encoder_2 is not None


def g_tokenizer(clip: ClipHandle) -> ClipTokenizer:
    return PaddedTokenizer(clip.tokenizer, CLIP_G_PAD)


def tokenize_sdxl(
    clip: ClipHandle,
    text_g: str,
    text_l: str | None = None,
    lookup: Callable[[str], EmbeddingLookup] | None = None,
) -> SdxlTokens:
    """Both encoders' tokens; `text_l` None means the same text (CLIPTextEncode).

    `lookup(key)` gives the embedding lookup for an encoder ("clip_l" / "clip_g" tensors of a file).
    With a separate `text_l` the shorter side is extended with empty-prompt chunks (nodes_clip_sdxl).
    """
    g = tokenize(text_g, g_tokenizer(clip), lookup("clip_g") if lookup else None)
    if clip.text_encoder is None:
        return SdxlTokens(g, None)
    same = text_l is None
    l_text = text_g if text_l is None else text_l
    tok_l = tokenize(l_text, clip.tokenizer, lookup("clip_l") if lookup else None)
    if not same:
        empty_g = tokenize("", g_tokenizer(clip)).chunks
        empty_l = tokenize("", clip.tokenizer).chunks
        while len(tok_l.chunks) < len(g.chunks):
            tok_l.chunks += [list(c) for c in empty_l]
        while len(g.chunks) < len(tok_l.chunks):
            g.chunks += [list(c) for c in empty_g]
    return SdxlTokens(g, tok_l)


def layer_of(clip: ClipHandle) -> int:
    return SDXL_DEFAULT_LAYER if clip.layer_idx is None else clip.layer_idx


@contextmanager
def patched_encoders(clip: ClipHandle) -> Iterator[tuple[Any, Any]]:
    """(CLIP-L or None, bigG), each computing with the handle's LoRA stack (`patched_clip`: CLIP-L as
    "te", bigG as "te2", the refiner's bigG as "te_g")."""
    with patched_clip(clip) as patched_handle:
        yield patched_handle.text_encoder, patched_handle.text_encoder_2


def encode_sdxl(
    clip: ClipHandle, tokens: SdxlTokens, warn: Warn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond `[1, 77k, 2048]` (refiner: 1280), pooled `[1, 1280]`) as ComfyUI's SDXLClipModel."""
    if clip.text_encoder_2 is None:
        raise SdxlClipError(
            f"CLIP from '{clip.source}' has no OpenCLIP bigG text encoder; it is not an SDXL CLIP"
        )
    layer = layer_of(clip)
    with torch.inference_mode(), patched_encoders(clip) as (te_l, te_g):
        cond_g, last_g = _encode(te_g, tokens.g.chunks, CLIP_G_PAD, layer, warn)
        first = tokens.g.chunks[0]
        index = _first_end([t for t, _ in first], clip.tokenizer.eos)
        device = next(te_g.parameters()).device
        pooled = te_g.text_projection(last_g[index : index + 1].to(device)).cpu().float()
        if te_l is None or tokens.l is None:
            return cond_g, pooled
        cond_l, _ = _encode(te_l, tokens.l.chunks, clip.tokenizer.pad, layer, warn)
    cut = min(cond_l.shape[1], cond_g.shape[1])
    return torch.cat([cond_l[:, :cut], cond_g[:, :cut]], dim=-1), pooled


def _encode(
    te: Any, chunks: list[list[WeightedToken]], pad: int, layer: int, warn: Warn | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder: (weighted hidden states `[1, 77k, width]`, chunk 0's final-LN last layer)."""
    has_weights = any(w != 1.0 for c in chunks for _, w in c)
    sequences: list[list[Any]] = [[t for t, _ in c] for c in chunks]
    if has_weights:  # ComfyUI gen_empty_tokens: start, end, then this encoder's pad
        bos, eos = 49406, 49407
        sequences.append([bos, eos] + [pad] * (len(sequences[0]) - 2))
    hidden, last = run_clip(te, sequences, layer, warn, normalize_hidden=False)
    hidden, last = hidden.cpu().float(), last.cpu().float()  # ComfyUI: conds are fp32
    return weighted_chunks(hidden, chunks, has_weights).clone(), last[0]


def width_of(clip: ClipHandle) -> int:
    """The conditioning width this CLIP produces (2048 base, 1280 refiner)."""
    width = int(tower(clip.text_encoder_2).config.hidden_size)
    if clip.text_encoder is not None:
        width += int(tower(clip.text_encoder).config.hidden_size)
    return width
