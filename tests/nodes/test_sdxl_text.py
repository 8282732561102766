"""SDXL text on the mini SDXL checkpoint: long prompts and `(word:1.2)` weights per encoder,
CLIPSetLastLayer with ComfyUI's semantics on both encoders, `clip_l` / `clip_g` embeddings, and
A1111 `<lora:...>` tags patching both encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes.conditioning import CLIPSetLastLayer, CLIPTextEncode
from nodes.conditioning_sdxl import CLIPTextEncodeSDXL
from nodes.loaders import CheckpointLoaderSimple
from nodes.lora import LoraLoader, LoraTagLoader
from nodes.sd.text_encoder import tower
from tests.conftest import assert_within_floor

L = slice(0, 768)  # CLIP-L's channels of an SDXL cond; bigG's are the rest
G = slice(768, 2048)
LONG = ", ".join(["a photo of a cat sitting on a red chair in a sunny garden"] * 8)  # > 75 tokens


@pytest.fixture(scope="module")
def clip(sdxl_env: Environment) -> Any:
    return CheckpointLoaderSimple().run(RecordingContext(sdxl_env), "mini_sdxl.safetensors")[1]


def _encode(env: Environment, clip: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    [[cond, options]] = CLIPTextEncode().run(RecordingContext(env), text, clip)[0]
    return cond, options["pooled_output"]


def _encode_sdxl(env: Environment, clip: Any, text_g: str, text_l: str) -> tuple[torch.Tensor, torch.Tensor]:
    node = CLIPTextEncodeSDXL()
    [[cond, options]] = node.run(RecordingContext(env), clip, 1024, 1024, 0, 0, 1024, 1024, text_g, text_l)[0]
    return cond, options["pooled_output"]


def test_a_long_text_g_is_chunked_and_text_l_is_evened_with_empty_chunks(
    sdxl_env: Environment, clip: Any
) -> None:
    cond, pooled = _encode_sdxl(sdxl_env, clip, LONG, "a cat")
    assert cond.shape == (1, 154, 2048)
    short, _ = _encode_sdxl(sdxl_env, clip, "a cat", "a cat")
    empty, _ = _encode(sdxl_env, clip, "")
    assert_within_floor(cond[:, 77:, L], empty[:, :, L])  # CLIP-L's second chunk: the empty prompt
    assert_within_floor(cond[:, :77, L], short[:, :, L])
    long_cond, long_pooled = _encode(sdxl_env, clip, LONG)  # CLIPTextEncode: both encoders chunk it
    assert long_cond.shape == (1, 154, 2048)
    assert torch.equal(long_cond[..., G], cond[..., G]) and torch.equal(long_pooled, pooled)
    assert not torch.allclose(long_cond[:, 77:, L], empty[:, :, L], atol=1e-2)


def test_weights_act_on_one_encoder_as_comfyui_weights_them(sdxl_env: Environment, clip: Any) -> None:
    plain, pooled = _encode_sdxl(sdxl_env, clip, "a cat on a chair", "a cat on a chair")
    weighted, weighted_pooled = _encode_sdxl(sdxl_env, clip, "a cat on a chair", "a (cat:1.2) on a chair")
    empty, _ = _encode(sdxl_env, clip, "")
    assert torch.equal(weighted[..., G], plain[..., G])  # text_g has no weights: untouched
    assert torch.equal(weighted_pooled, pooled)  # weights never reach the pooled output
    # ComfyUI: z = (z - z_empty) * w + z_empty at the weighted token (position 2: start, "a", "cat")
    want = plain[..., L].clone()
    want[:, 2] = (plain[:, 2, L] - empty[:, 2, L]) * 1.2 + empty[:, 2, L]
    assert_within_floor(weighted[..., L], want)
    assert not torch.allclose(weighted[:, 2, L], plain[:, 2, L])


def _hf_hidden(te: Any, ids: list[int]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """transformers' own forward: (final-LN last state, every layer's output)."""
    with torch.no_grad():
        out = te(torch.tensor([ids]), output_hidden_states=True)
    return out.last_hidden_state, out.hidden_states


def test_clip_set_last_layer_sets_both_encoders_without_the_final_norm(
    sdxl_env: Environment, clip: Any
) -> None:
    ctx = RecordingContext(sdxl_env)
    default, pooled = _encode(sdxl_env, clip, "a cat")
    minus2 = CLIPSetLastLayer().run(ctx, clip, -2)[0]
    assert torch.equal(_encode(sdxl_env, minus2, "a cat")[0], default)  # SDXL's own default
    ids_l = [49406, 320, 2368, 49407] + [49407] * 73  # "a cat", CLIP-L pads with the end token
    ids_g = ids_l[:4] + [0] * 73  # bigG pads with 0
    last_l, hidden_l = _hf_hidden(clip.text_encoder, ids_l)
    _, hidden_g = _hf_hidden(clip.text_encoder_2, ids_g)
    assert_within_floor(default[..., L], hidden_l[-2])
    assert_within_floor(default[..., G], hidden_g[-2])
    minus1 = CLIPSetLastLayer().run(ctx, clip, -1)[0]
    cond1, pooled1 = _encode(sdxl_env, minus1, "a cat")
    assert_within_floor(cond1[..., L], hidden_l[-1])  # the last layer, not normalised
    assert_within_floor(cond1[..., G], hidden_g[-1])
    assert torch.equal(pooled1, pooled)  # the pooled output is always the last layer's
    # beyond CLIP-L's 12 layers ComfyUI falls back to its normalised last layer; bigG (32) has layer -13
    cond13, _ = _encode(sdxl_env, CLIPSetLastLayer().run(ctx, clip, -13)[0], "a cat")
    assert_within_floor(cond13[..., L], last_l)
    assert_within_floor(cond13[..., G], hidden_g[-13])


def test_an_sdxl_embedding_gives_each_encoder_its_own_vectors(sdxl_env: Environment, clip: Any) -> None:
    """An embedding whose clip_l / clip_g rows are each encoder's "cat" token encodes as the word."""
    cat = 2368
    rows = {
        "clip_l": tower(clip.text_encoder).embeddings.token_embedding.weight[cat : cat + 1].clone(),
        "clip_g": tower(clip.text_encoder_2).embeddings.token_embedding.weight[cat : cat + 1].clone(),
    }
    folder = sdxl_env.folders.paths("embeddings")[0]
    save_file(rows, str(folder / "xl_cat.safetensors"))
    with_embedding, pooled = _encode(sdxl_env, clip, "a embedding:xl_cat on a chair")
    word, word_pooled = _encode(sdxl_env, clip, "a cat on a chair")
    assert torch.equal(with_embedding, word) and torch.equal(pooled, word_pooled)
    swapped = {"clip_l": rows["clip_l"], "clip_g": torch.zeros_like(rows["clip_g"])}
    save_file(swapped, str(folder / "xl_l_only.safetensors"))
    other, _ = _encode(sdxl_env, clip, "a embedding:xl_l_only on a chair")
    assert torch.equal(other[..., L], word[..., L]) and not torch.equal(other[..., G], word[..., G])


def test_a1111_lora_tags_patch_both_encoders_as_lora_loader_does(
    sdxl_env: Environment, clip: Any, mini_sdxl_loras: Path
) -> None:
    name = "mini_sdxl_lora.safetensors"
    link = sdxl_env.folders.paths("loras")[0] / name
    if not link.exists():
        link.symlink_to(mini_sdxl_loras / name)
    ctx = RecordingContext(sdxl_env)
    model = CheckpointLoaderSimple().run(ctx, "mini_sdxl.safetensors")[0]
    tag_model, tag_clip, text = LoraTagLoader().run(
        ctx, model, clip, "a cat <lora:mini_sdxl_lora:0.8:0.6> on a chair"
    )
    ref_model, ref_clip = LoraLoader().run(ctx, model, clip, name, 0.6, 0.8)  # A1111: <lora:name:te:unet>
    assert "<lora" not in text and "cat" in text
    assert (
        [(r.path.name, r.strength) for r in tag_model.loras]
        == [(name, 0.6)]
        == [(r.path.name, r.strength) for r in ref_model.loras]
    )
    tagged, tagged_pooled = _encode(sdxl_env, tag_clip, "a cat on a chair")
    want, want_pooled = _encode(sdxl_env, ref_clip, "a cat on a chair")
    assert torch.equal(tagged, want) and torch.equal(tagged_pooled, want_pooled)
    plain, plain_pooled = _encode(sdxl_env, clip, "a cat on a chair")
    for part in (L, G):  # CLIP-L (lora_te1_) and bigG (lora_te2_) both moved
        assert not torch.allclose(tagged[..., part], plain[..., part], atol=1e-3)
    assert not torch.allclose(tagged_pooled, plain_pooled, atol=1e-3)
