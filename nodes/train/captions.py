"""Caption handling per step, as kohya's `BaseDataset.process_caption` and its text encoding.

Shuffle the comma-separated tags (the first `keep_tokens` stay in place), drop tags or the whole
caption at a rate, then tokenise into 75-token chunks (kohya's `--max_token_length` 150/225 uses 2
or 3 chunks, each `BOS + 75 + EOS`, whose hidden states are joined back into one sequence).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from nodes.sd.tokenizer import ClipTokenizer


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's caption options (the CLI path applies them to every subset)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """Whether a caption can differ from step to step."""
        return bool(
            self.shuffle_caption
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
        )


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int) -> str:
    """One step's caption (`epoch` counts from 1, as kohya's `current_epoch`)."""
    drop = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    drop = drop or (
        opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0
    )
    if drop:
        return ""
    caption = caption.split("\n")[0]
    if not (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0):
        return caption
    tokens = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tokens[: opts.keep_tokens], tokens[opts.keep_tokens :]
    if opts.shuffle_caption:
        rng.shuffle(flex)
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flex)


def chunked_ids(caption: str, tokenizer: ClipTokenizer, max_token_length: int | None) -> list[list[int]]:
    """Chunks of 77 ids: `BOS, 75 tokens, EOS` each, padded with the pad id (EOS for SD1.x).

    A tokenizer padding with another id (SDXL's bigG pads with 0) gets kohya's fix-ups of each
    chunk after the first of 150/225 tokens (`strategy_base._get_input_ids`, "v2 or SDXL"): a chunk
    ending in text gets EOS as its last id, one starting with padding gets EOS as its first token.
    """
    length = max_token_length or 75
    n = length // 75
    ids = tokenizer.encode(caption)[:length]
    full = [tokenizer.bos, *ids, tokenizer.eos]
    full += [tokenizer.pad] * (length + 2 - len(full))
    chunks = [[full[0], *full[1 + 75 * i : 76 + 75 * i], full[-1]] for i in range(n)]
    if n > 1 and tokenizer.pad != tokenizer.eos:
        for chunk in chunks:
            if chunk[-2] not in (tokenizer.eos, tokenizer.pad):
                chunk[-1] = tokenizer.eos
            if chunk[1] == tokenizer.pad:
                chunk[1] = tokenizer.eos
    return chunks


def join_chunks(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """kohya's `get_hidden_states` for SD1.x: `[B*n, 77, C]` -> `[B, 75n+2, C]` (first BOS, last EOS)."""
    if n == 1:
        return hidden
    b = hidden.shape[0] // n
    h = hidden.reshape(b, n, 77, -1)
    parts = [h[:, 0, :1]] + [h[:, i, 1:76] for i in range(n)] + [h[:, n - 1, 76:]]
    return torch.cat(parts, dim=1)
