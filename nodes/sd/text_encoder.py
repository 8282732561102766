"""CLIP-L text encoding with ComfyUI's conventions (`comfy/sd1_clip.py`), on a transformers CLIPTextModel.

1. Every 77-token chunk, plus an "empty" sequence when any weight is not 1, goes through CLIP in
   one batch (only a causal mask, padding attended, as in ComfyUI and diffusers).
2. The output is the final-layer-normed last hidden state, or with CLIP skip (`layer_idx` -n)
   the final-layer-normed hidden state after layer 12-n+1.
3. A weighted token is `z_empty + w·(z - z_empty)` at its own position.
4. Chunks are concatenated along the token axis; the pooled output is the first chunk's final
   hidden state at its first end token.
The encoder runs inside `patched(..., target="te")`, the only place LoRA weights are applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from nodes.sd.handles import ClipHandle
from nodes.sd.patcher import patched
from nodes.sd.prompt import Tokenized, WeightedToken

Warn = Callable[[str], None]


def encode_prompt(
    clip: ClipHandle, tokenized: Tokenized, warn: Warn | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond `[1, 77k, width]`, pooled `[1, width]`) for tokenized chunks, CLIP skip and LoRAs of `clip`."""
    chunks = tokenized.chunks
    has_weights = any(w != 1.0 for c in chunks for _, w in c)
    sequences: list[list[Any]] = [[t for t, _ in c] for c in chunks]
    if has_weights:
        tok = clip.tokenizer
        sequences.append([tok.bos, tok.eos] + [tok.pad] * (len(sequences[0]) - 2))
    with torch.inference_mode(), patched(clip.text_encoder, clip.loras, target="te") as te:
        hidden, last = run_clip(te, sequences, clip.layer_idx, warn)
        hidden, last = hidden.cpu().float(), last.cpu().float()  # ComfyUI: conds are fp32
    pooled = last[0:1, _first_end(sequences[0], clip.tokenizer.eos)]
    return weighted_chunks(hidden, chunks, has_weights).clone(), pooled.clone()


def weighted_chunks(
    hidden: torch.Tensor, chunks: Sequence[Sequence[WeightedToken]], has_weights: bool
) -> torch.Tensor:
    """The chunks' hidden states `[1, 77k, width]`, each token's weight applied against the empty
    sequence (the last row of `hidden` when `has_weights`), as ComfyUI's encode_token_weights."""
    outputs = []
    for k, chunk_tokens in enumerate(chunks):
        z = hidden[k]
        if has_weights:
            z = _apply_weights(z, hidden[-1], chunk_tokens)
        outputs.append(z)
    return torch.cat(outputs, dim=0).unsqueeze(0)


def _apply_weights(z: torch.Tensor, z_empty: torch.Tensor, tokens: Sequence[WeightedToken]) -> torch.Tensor:
    weights = torch.tensor([w for _, w in tokens], dtype=torch.float64)
    rows = (weights != 1.0).nonzero().flatten()
    if rows.numel() == 0:
        return z
    z = z.clone()
    w = weights[rows].to(z.dtype).unsqueeze(1)
    z[rows] = (z[rows] - z_empty[rows]) * w + z_empty[rows]
    return z


def _first_end(tokens: Sequence[Any], eos: int) -> int:
    for i, t in enumerate(tokens):
        if isinstance(t, int) and t == eos:
            return i
    return len(tokens) - 1


def tower(te: Any) -> Any:
    """The text transformer of a CLIP model (`CLIPTextModelWithProjection` nests it in `text_model`)."""
    return getattr(te, "text_model", te)


def input_embeddings(te: Any, sequences: Sequence[Sequence[Any]], warn: Warn | None) -> torch.Tensor:
    """Token embeddings `[B, T, width]`, with textual-inversion vectors spliced in at their positions."""
    table = tower(te).embeddings.token_embedding.weight
    width = table.shape[1]
    pad = sequences[0][-1] if isinstance(sequences[0][-1], int) else 49407
    rows: list[torch.Tensor] = []
    for seq in sequences:
        ids = [t if isinstance(t, int) else pad for t in seq]
        emb = table[torch.tensor(ids, device=table.device)].clone()
        for i, t in enumerate(seq):
            if isinstance(t, int):
                continue
            vector = torch.as_tensor(t, dtype=emb.dtype, device=emb.device).reshape(-1)
            if vector.shape[0] != width:
                if warn is not None:
                    warn(f"an embedding has width {vector.shape[0]}, this CLIP needs {width}; it was ignored")
                continue
            emb[i] = vector
        rows.append(emb)
    return torch.stack(rows)


def run_clip(
    te: Any,
    sequences: Sequence[Sequence[Any]],
    layer_idx: int | None,
    warn: Warn | None = None,
    normalize_hidden: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected hidden state, last hidden state after final LN), both `[B, T, width]`.

    `normalize_hidden` True (SD1.x): the selected state gets the final LayerNorm, and -1 is the last.
    False (SDXL, ComfyUI `layer_norm_hidden_state=False`): a picked layer, -1 included, is returned
    as it is; only a `layer_idx` beyond the depth falls back to the normalised last layer.
    """
    clip = tower(te)
    x = clip.embeddings(inputs_embeds=input_embeddings(te, sequences, warn))
    length = x.shape[1]
    # ComfyUI's causal mask: -finfo.max above the diagonal (not -inf), added to the attention scores.
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device)
    mask = mask.triu_(1)[None, None]
    layers = clip.encoder.layers
    if normalize_hidden:
        pick = _hidden_index(layer_idx, len(layers))
    else:
        pick = _hidden_index_raw(layer_idx, len(layers))
    selected = None
    for i, layer in enumerate(layers):
        x = layer(x, mask)
        if i == pick:
            selected = x
    norm = clip.final_layer_norm
    last = norm(x)
    if selected is None:
        return last, last
    return (norm(selected) if normalize_hidden else selected), last


def _hidden_index(layer_idx: int | None, num_layers: int) -> int | None:
    """Index of the layer whose output is used, or None for the last (ComfyUI: |n| > layers means last)."""
    if layer_idx is None or abs(layer_idx) > num_layers or layer_idx == -1:
        return None
    return layer_idx if layer_idx >= 0 else num_layers + layer_idx


def _hidden_index_raw(layer_idx: int | None, num_layers: int) -> int | None:
    """As `_hidden_index`, but -1 picks the last layer itself (to be used without the final LN)."""
    if layer_idx is None or abs(layer_idx) > num_layers:
        return None
    return layer_idx if layer_idx >= 0 else num_layers + layer_idx
