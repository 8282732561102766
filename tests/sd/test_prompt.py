"""ComfyUI's prompt weighting syntax and 77-token chunking (comfy/sd1_clip.py), rule by rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from nodes.sd.prompt import parse_weights, tokenize
from nodes.sd.tokenizer import default_tokenizer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("(cat)", [("cat", 1.1)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("(cat:1.5)", [("cat", 1.5)]),
        ("((cat:1.5))", [("cat", 1.5)]),
        ("((cat):0.5)", [("cat", 0.5 * 1.1)]),
        ("[cat]", [("[cat]", 1.0)]),
        ("a \\(cat\\) b", [("a (cat) b", 1.0)]),
        ("a (b:x) c", [("a ", 1.0), ("b:x", 1.1), (" c", 1.0)]),
        ("a) (b", [("a) (b", 1.0)]),
        ("(red cat:1.3), [blue]", [("red cat", 1.3), (", [blue]", 1.0)]),
        ("(:2)", [(":2", 1.1)]),
    ],
)
def test_weight_syntax(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_weights(text) == expected


def _ids(chunk: list[tuple[Any, float]]) -> list[Any]:
    return [t for t, _ in chunk]


def test_empty_prompt_is_one_chunk_of_bos_eos_and_padding() -> None:
    chunks = tokenize("", default_tokenizer()).chunks
    assert _ids(chunks[0]) == [49406, 49407] + [49407] * 75 and len(chunks) == 1


def test_a_long_prompt_fills_76_slots_per_chunk() -> None:
    text = ", ".join(["cat"] * 50)  # one group of 99 tokens: large, so it is split
    chunks = tokenize(text, default_tokenizer()).chunks
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert _ids(chunks[0])[0] == 49406 and _ids(chunks[0])[-1] == 49407 and 49407 not in _ids(chunks[0])[1:-1]
    assert _ids(chunks[1])[1:24] == default_tokenizer().encode(text)[75:98]


def test_a_short_group_that_does_not_fit_moves_whole_to_the_next_chunk() -> None:
    tok = default_tokenizer()
    first = ", ".join(["cat"] * 37)  # 73 tokens
    chunks = tokenize(f"{first}(red dog)", tok).chunks  # 73 + 2 tokens fit in 75
    assert len(chunks) == 1
    chunks = tokenize(f"{first}, (a red dog on a chair:1.2)", tok).chunks  # 74 + 6 tokens: moved whole
    assert len(chunks) == 2
    assert _ids(chunks[0])[75:] == [49407, 49407]
    assert [w for _, w in chunks[1][1:8]] == [1.2] * 6 + [1.0]


def test_an_embedding_becomes_its_vectors_with_the_segment_weight() -> None:
    vectors = torch.arange(6.0).reshape(2, 3)
    lookup = {"style": vectors}.get
    result = tokenize("a (embedding:style cat:1.2)", default_tokenizer(), lookup)
    tokens = result.chunks[0]
    assert torch.equal(tokens[2][0], vectors[0]) and torch.equal(tokens[3][0], vectors[1])
    assert [w for _, w in tokens[1:5]] == [1.0, 1.2, 1.2, 1.2]
    assert tokens[4][0] == default_tokenizer().encode("cat")[0]
    assert result.missing_embeddings == []


def test_a_missing_embedding_is_reported_and_dropped_with_its_text_kept() -> None:
    result = tokenize("a embedding:nothere cat", default_tokenizer(), {}.get)
    assert result.missing_embeddings == ["nothere"]
    assert _ids(result.chunks[0])[:4] == [49406, 320, 2368, 49407]


def test_an_embedding_name_with_a_trailing_comma_is_found() -> None:
    vectors = torch.ones(1, 3)
    result = tokenize("embedding:style, cat", default_tokenizer(), {"style": vectors}.get)
    tokens = result.chunks[0]
    assert torch.equal(tokens[1][0], vectors[0])
    assert tokens[2][0] == 267  # the comma is tokenized as text
