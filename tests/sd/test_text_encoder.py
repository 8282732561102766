"""CLIP text encoding against ComfyUI's CLIPTextEncode outputs (oracle cond_*.npy), and its conventions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from nodes.sd.checkpoint import LoadedCheckpoint
from nodes.sd.handles import ClipHandle, LoraRef
from nodes.sd.prompt import tokenize
from nodes.sd.text_encoder import encode_prompt
from nodes.sd.tokenizer import default_tokenizer
from tests.conftest import ORACLE, assert_within_floor

REFS = ORACLE / "refs"
GATE = 2e-5  # ComfyUI's own run-to-run noise is ~1e-6 here; we measure ~2.6e-6


@pytest.fixture(scope="module")
def clip(loaded_mini: LoadedCheckpoint) -> ClipHandle:
    return ClipHandle(loaded_mini.text_encoder, default_tokenizer(), "mini", "sd15")


def _encode(clip: ClipHandle, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompt(clip, tokenize(text, clip.tokenizer))


def _check(clip: ClipHandle, workflow: str) -> None:
    texts = json.loads((REFS / workflow / "tokens.json").read_text())
    checked = 0
    for side in ("pos", "neg"):
        ref_file = REFS / workflow / f"cond_{side}.npy"
        if not ref_file.exists():
            continue
        cond, _ = _encode(clip, texts[side]["text"])
        ref = np.load(ref_file)
        assert cond.shape == ref.shape
        assert float(np.abs(cond.numpy() - ref).max()) < GATE, (workflow, side)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("workflow", ["baseline", "prompt_weighting"])
def test_cond_matches_comfyui(clip: ClipHandle, workflow: str) -> None:
    _check(clip, workflow)


def test_clip_skip_2_matches_comfyui(clip: ClipHandle) -> None:
    _check(replace(clip, layer_idx=-2), "clip_skip_2")


def test_lora_cond_matches_comfyui_and_the_base_returns_after(clip: ClipHandle, mini_loras: Path) -> None:
    path = mini_loras / "mini_lora_a.safetensors"
    stat = path.stat()
    lora = LoraRef(path, (stat.st_mtime_ns, stat.st_size), 1.0, path.name)
    _check(clip.with_lora(lora), "lora_single_a")
    _check(clip, "baseline")


def test_layer_minus_one_and_out_of_range_equal_the_default(clip: ClipHandle) -> None:
    base, _ = _encode(clip, "a cat")
    for layer in (-1, -24):
        got, _ = _encode(replace(clip, layer_idx=layer), "a cat")
        assert torch.equal(got, base)
    skipped, _ = _encode(replace(clip, layer_idx=-2), "a cat")
    assert not torch.allclose(skipped, base)


def test_pooled_is_the_final_state_at_the_first_end_token(clip: ClipHandle) -> None:
    cond, pooled = _encode(clip, "a cat")
    assert pooled.shape == (1, 768)
    assert torch.equal(pooled[0], cond[0, 3])  # BOS a cat EOS


def test_a_long_prompt_gives_two_chunks_and_the_first_chunks_pooled(clip: ClipHandle) -> None:
    text = ", ".join(["cat"] * 50)
    cond, pooled = _encode(clip, text)
    assert cond.shape == (1, 154, 768)
    first = tokenize(text, clip.tokenizer).chunks[:1]
    alone = encode_prompt(clip, replace(tokenize(text, clip.tokenizer), chunks=first))
    assert_within_floor(cond[:, :77], alone[0])  # two chunks run as one batch: kernel noise only
    assert_within_floor(pooled, cond[:, 76])


def test_weight_interpolates_from_the_empty_prompt_at_each_position(clip: ClipHandle) -> None:
    plain, _ = _encode(clip, "a cat")
    weighted, _ = _encode(clip, "a (cat:1.5)")
    empty, _ = _encode(clip, "")
    expected = (plain[0, 2] - empty[0, 2]) * 1.5 + empty[0, 2]
    assert torch.allclose(weighted[0, 2], expected, atol=1e-5)
    assert torch.allclose(weighted[0, 1], plain[0, 1], atol=1e-5)


def test_an_embedding_of_the_words_own_vectors_encodes_like_the_words(clip: ClipHandle) -> None:
    tok = clip.tokenizer
    table = clip.text_encoder.embeddings.token_embedding.weight
    vectors = table[torch.tensor(tok.encode("red cat"))].detach().clone()
    words, _ = _encode(clip, "a red cat")
    embedded = encode_prompt(clip, tokenize("a embedding:rc", tok, {"rc": vectors}.get))[0]
    assert torch.allclose(words, embedded, atol=1e-6)
