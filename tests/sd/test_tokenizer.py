"""CLIP token ids against ComfyUI's own `tokenize_with_weights` output for every oracle workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes.sd.prompt import tokenize
from nodes.sd.tokenizer import BOS, EOS, default_tokenizer
from tests.conftest import ORACLE

REFS = sorted((ORACLE / "refs").glob("*/tokens.json"))


def test_the_oracle_has_token_lists() -> None:
    assert len(REFS) >= 9


@pytest.mark.parametrize("tokens_file", REFS, ids=lambda p: p.parent.name)
def test_tokens_and_weights_equal_comfyui(tokens_file: Path) -> None:
    data = json.loads(tokens_file.read_text())
    for side in ("pos", "neg"):
        expected = [[(t, w) for t, w in chunk] for chunk in data[side]["chunks"]]
        got = tokenize(data[side]["text"], default_tokenizer()).chunks
        assert got == expected, (tokens_file.parent.name, side)


def test_case_and_whitespace_do_not_change_ids() -> None:
    tok = default_tokenizer()
    assert tok.encode("A  Photo\nof a CAT") == tok.encode("a photo of a cat")
    assert tok.encode("   ") == []


def test_known_ids() -> None:
    tok = default_tokenizer()
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert (tok.bos, tok.eos) == (BOS, EOS) == (49406, 49407)
