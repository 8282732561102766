"""ComfyUI's prompt syntax: weights, escapes, `embedding:` references and the 77-token chunks.

A faithful restatement of `comfy/sd1_clip.py` (`escape_important`, `parse_parentheses`,
`token_weights`, `SDTokenizer.tokenize_with_weights`), quirks included: `(x)` multiplies by 1.1,
`(x:w)` sets w absolutely, `[x]` is plain text, `\\(`/`\\)` are literal parentheses, an unmatched
`)` is kept as text, and each weighted segment is tokenized on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nodes.sd.tokenizer import ClipTokenizer

EMBEDDING_PREFIX = "embedding:"
MAX_WORD_LENGTH = 8  # a group shorter than this is moved whole to the next chunk
_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"

# A token is a vocabulary id or an embedding vector (any object; a torch tensor in practice).
Token = Any
WeightedToken = tuple[Token, float]
EmbeddingLookup = Callable[[str], Any]  # name -> [n, width] vectors, or None when absent


@dataclass
class Tokenized:
    """Chunks of exactly 77 (token, weight) pairs, plus the embedding names that were not found."""

    chunks: list[list[WeightedToken]]
    missing_embeddings: list[str] = field(default_factory=list)


def escape_important(text: str) -> str:
    return text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)


def unescape_important(text: str) -> str:
    return text.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "(")


def parse_parentheses(text: str) -> list[str]:
    """Split into top-level `( ... )` groups and plain runs (ComfyUI's state machine, unbalanced too)."""
    result: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        result.append(current)
    return result


def token_weights(text: str, current_weight: float) -> list[tuple[str, float]]:
    """(segment, weight) pairs: a group multiplies by 1.1 unless it ends in `:<float>`, which sets it."""
    out: list[tuple[str, float]] = []
    for part in parse_parentheses(text):
        weight = current_weight
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            colon = inner.rfind(":")
            weight *= 1.1
            if colon > 0:
                try:
                    weight = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += token_weights(inner, weight)
        else:
            out.append((part, current_weight))
    return out


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The weighted segments of a prompt, escapes restored."""
    return [(unescape_important(seg), w) for seg, w in token_weights(escape_important(text), 1.0)]


def tokenize(text: str, tokenizer: ClipTokenizer, embeddings: EmbeddingLookup | None = None) -> Tokenized:
    """ComfyUI's `tokenize_with_weights` for SD1 CLIP-L: weighted groups, then 77-token chunks."""
    groups: list[list[WeightedToken]] = []
    missing: list[str] = []
    for segment, weight in parse_weights(text):
        for word in _split_embeddings(segment):
            if word.startswith(EMBEDDING_PREFIX) and embeddings is not None:
                vectors, leftover, name = _take_embedding(
                    word[len(EMBEDDING_PREFIX) :].strip("\n"), embeddings
                )
                if vectors is None:
                    missing.append(name)
                else:
                    groups.append([(vectors[i], weight) for i in range(vectors.shape[0])])
                if not leftover:
                    continue
                word = leftover
            groups.append([(t, weight) for t in tokenizer.encode(word)])
    return Tokenized(chunk(groups, tokenizer), missing)


def _split_embeddings(segment: str) -> list[str]:
    parts = re.split(f" {EMBEDDING_PREFIX}|\n{EMBEDDING_PREFIX}", segment)
    words = [parts[0]] + [EMBEDDING_PREFIX + p for p in parts[1:]]
    return [w for w in words if w != ""]


def _take_embedding(text: str, embeddings: EmbeddingLookup) -> tuple[Any, str, str]:
    """(vectors or None, leftover text, name): the name is the first word; trailing commas retried."""
    words = text.split()
    if not words:
        return None, "", ""
    name, leftover = words[0], " ".join(words[1:])
    vectors = embeddings(name)
    if vectors is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            return embeddings(stripped), f"{name[len(stripped) :]} {leftover}", name
    return _as_2d(vectors), leftover, name


def _as_2d(vectors: Any) -> Any:
    if vectors is not None and len(vectors.shape) == 1:
        return vectors.reshape(1, -1)
    return vectors


def chunk(groups: list[list[WeightedToken]], tokenizer: ClipTokenizer) -> list[list[WeightedToken]]:
    """Pack groups into 77-token BOS..EOS PAD* chunks; a group of >= 8 tokens may split, a shorter moves."""
    size, bos, eos, pad = tokenizer.max_length, tokenizer.bos, tokenizer.eos, tokenizer.pad
    batch: list[WeightedToken] = [(bos, 1.0)]
    chunks = [batch]
    for group in groups:
        is_large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(batch) > size - 1:
                remaining = size - len(batch) - 1
                if is_large:
                    batch.extend(group[:remaining])
                    batch.append((eos, 1.0))
                    group = group[remaining:]
                else:
                    batch.append((eos, 1.0))
                    batch.extend([(pad, 1.0)] * remaining)
                batch = [(bos, 1.0)]
                chunks.append(batch)
            else:
                batch.extend(group)
                group = []
    batch.append((eos, 1.0))
    batch.extend([(pad, 1.0)] * (size - len(batch)))
    return chunks
