"""CLIPTextEncode, CLIPSetLastLayer, ConditioningCombine, ConditioningZeroOut as nodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes.conditioning import CLIPSetLastLayer, CLIPTextEncode, ConditioningCombine, ConditioningZeroOut
from nodes.loaders import CheckpointLoaderSimple
from nodes.sd.handles import ClipHandle
from tests.conftest import ORACLE

REFS = ORACLE / "refs"
PROMPT = "a photo of a cat sitting on a red chair, highly detailed"


@pytest.fixture(scope="module")
def clip(models_env: Environment) -> ClipHandle:
    return CheckpointLoaderSimple().run(RecordingContext(models_env), "mini.safetensors")[1]


def test_encode_node_gives_comfyuis_conditioning(models_env: Environment, clip: ClipHandle) -> None:
    (cond,) = CLIPTextEncode().run(RecordingContext(models_env), PROMPT, clip)
    assert len(cond) == 1 and set(cond[0][1]) == {"pooled_output"}
    ref = np.load(REFS / "baseline" / "cond_pos.npy")
    assert float(np.abs(cond[0][0].numpy() - ref).max()) < 2e-5


def test_set_last_layer_gives_clip_skip_without_touching_the_input(
    models_env: Environment, clip: ClipHandle
) -> None:
    (skipped,) = CLIPSetLastLayer().run(RecordingContext(models_env), clip, -2)
    assert skipped.layer_idx == -2 and clip.layer_idx is None
    (cond,) = CLIPTextEncode().run(RecordingContext(models_env), PROMPT, skipped)
    ref = np.load(REFS / "clip_skip_2" / "cond_pos.npy")
    assert float(np.abs(cond[0][0].numpy() - ref).max()) < 2e-5


def test_missing_embedding_warns_and_is_dropped(models_env: Environment, clip: ClipHandle) -> None:
    ctx = RecordingContext(models_env)
    (with_missing,) = CLIPTextEncode().run(ctx, "a embedding:nothere cat", clip)
    (plain,) = CLIPTextEncode().run(RecordingContext(models_env), "a cat", clip)
    assert ctx.warnings and "embedding:nothere does not exist" in ctx.warnings[0][0]
    assert torch.equal(with_missing[0][0], plain[0][0])


def test_an_a1111_embedding_file_is_used(models_env: Environment, clip: ClipHandle) -> None:
    table = clip.text_encoder.embeddings.token_embedding.weight
    vectors = table[torch.tensor(clip.tokenizer.encode("red cat"))].detach().clone()
    folder = models_env.folders.paths("embeddings")[0]
    torch.save({"string_to_param": {"*": vectors}, "name": "redcat"}, folder / "redcat.pt")
    ctx = RecordingContext(models_env)
    (embedded,) = CLIPTextEncode().run(ctx, "a embedding:redcat", clip)
    (words,) = CLIPTextEncode().run(ctx, "a red cat", clip)
    assert ctx.warnings == []
    assert torch.allclose(embedded[0][0], words[0][0], atol=1e-6)


def test_combine_concatenates_and_zero_out_zeroes(models_env: Environment) -> None:
    a = [[torch.ones(1, 77, 768), {"pooled_output": torch.ones(1, 768)}]]
    b = [[torch.full((1, 77, 768), 2.0), {"pooled_output": torch.ones(1, 768)}]]
    ctx = RecordingContext(models_env)
    (both,) = ConditioningCombine().run(ctx, a, b)
    assert len(both) == 2 and both[0] is a[0] and both[1] is b[0]
    (zero,) = ConditioningZeroOut().run(ctx, both)
    assert all(not c.any() and not o["pooled_output"].any() for c, o in zero)
    assert a[0][0].all() and a[0][1]["pooled_output"].all()  # inputs untouched


def test_encode_without_clip_explains(models_env: Environment) -> None:
    with pytest.raises(ValueError, match="clip input is invalid"):
        CLIPTextEncode().run(RecordingContext(models_env), "x", None)  # type: ignore[arg-type]
