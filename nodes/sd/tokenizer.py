"""CLIP BPE tokenization for SD1.x, offline.

`instant_clip_tokenizer` embeds OpenAI's CLIP vocabulary and merges and needs only numpy, so no
tokenizer file is ever fetched from a model hub at run time; its ids equal the HF `CLIPTokenizer`
ids ComfyUI uses (checked against ComfyUI's own token lists in the oracle tests).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
PAD = 49407  # SD1 CLIP-L pads with the end token (ComfyUI `pad_with_end=True`)
MAX_LENGTH = 77

_WHITESPACE = re.compile(r"\s+")


class ClipTokenizer:
    """Text -> CLIP token ids without the BOS/EOS markers (ComfyUI strips them per segment)."""

    bos = BOS
    eos = EOS
    pad = PAD
    max_length = MAX_LENGTH

    def __init__(self) -> None:
        import instant_clip_tokenizer

        self._tok: Any = instant_clip_tokenizer.Tokenizer()
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        # HF's CLIPTokenizer (what ComfyUI calls) collapses whitespace and lowercases; so do we.
        cleaned = _WHITESPACE.sub(" ", text).strip()
        if not cleaned:
            return []
        with self._lock:
            return [int(t) for t in self._tok.encode(cleaned)]

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return str(self._tok.decode([i for i in ids if i not in (BOS, EOS)]))


@lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The one shared tokenizer (it holds the whole vocabulary; build it once)."""
    return ClipTokenizer()


class PaddedTokenizer(ClipTokenizer):
    """A tokenizer seen with another pad token: bigG pads with 0 (ComfyUI `pad_with_end=False`).

    Shares the inner tokenizer's vocabulary (no second copy)."""

    def __init__(self, inner: ClipTokenizer, pad: int) -> None:  # noqa: D107 - no super(): shares `inner`
        self.inner = inner
        self.pad = pad

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


CLIP_G_PAD = 0
