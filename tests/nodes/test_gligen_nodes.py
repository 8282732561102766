"""GLIGENLoader and GLIGENTextBoxApply: ComfyUI's declarations (nodes.py), the conditioning they build
on the mini SD1.5 checkpoint, and a refused file named in the error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.testing import RecordingContext
from nodes import all_nodes
from nodes.conditioning import CLIPTextEncode
from nodes.gligen import GLIGENLoader, GLIGENTextBoxApply
from nodes.loaders import CheckpointLoaderSimple
from nodes.sd.gligen import GligenModel
from nodes.sd.ksampler import SamplingRequest, sample

BY_ID = {cls.NODE_ID: cls for cls in all_nodes()}
SIZE = {"min": 8, "max": 16384, "step": 8}
POSITION = {"min": 0, "max": 16384, "step": 8}


def test_declarations_match_comfyui() -> None:
    loader = BY_ID["GLIGENLoader"].info(None)
    assert (loader["category"], loader["display_name"]) == ("loaders", "GLIGENLoader")
    assert list(loader["input"]["required"]) == ["gligen_name"]
    assert isinstance(loader["input"]["required"]["gligen_name"][0], list)
    assert (loader["output"], loader["output_name"]) == (["GLIGEN"], ["GLIGEN"])
    apply = BY_ID["GLIGENTextBoxApply"].info(None)
    assert (apply["category"], apply["display_name"]) == ("conditioning/gligen", "GLIGENTextBoxApply")
    required = apply["input"]["required"]
    assert list(required) == [
        "conditioning_to",
        "clip",
        "gligen_textbox_model",
        "text",
        "width",
        "height",
        "x",
        "y",
    ]
    assert [required[k][0] for k in ("conditioning_to", "clip", "gligen_textbox_model", "text")] == [
        "CONDITIONING",
        "CLIP",
        "GLIGEN",
        "STRING",
    ]
    assert {k: required["text"][1][k] for k in ("multiline", "dynamicPrompts")} == {
        "multiline": True,
        "dynamicPrompts": True,
    }
    for name, default, limits in (
        ("width", 64, SIZE),
        ("height", 64, SIZE),
        ("x", 0, POSITION),
        ("y", 0, POSITION),
    ):
        assert required[name] == ["INT", {"default": default, **limits}], name
    assert (apply["output"], apply["output_name"]) == (["CONDITIONING"], ["CONDITIONING"])


@pytest.fixture(scope="module")
def gligen_env(
    tmp_path_factory: pytest.TempPathFactory, mini_checkpoint: Path, mini_gligen: Path
) -> Environment:
    base = tmp_path_factory.mktemp("gligen")
    for folder, file, name in (
        ("checkpoints", mini_checkpoint, mini_checkpoint.name),
        ("gligen", mini_gligen, "gligen_sd14_textbox_pruned.safetensors"),
        ("gligen", mini_checkpoint, "not_gligen.safetensors"),
    ):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).symlink_to(file)
    return Environment(Folders.at(base))


@pytest.fixture(scope="module")
def loaded(gligen_env: Environment) -> Any:
    ctx = RecordingContext(gligen_env)
    assert gligen_env.folders.list("gligen") == [
        "gligen_sd14_textbox_pruned.safetensors",
        "not_gligen.safetensors",
    ]
    (model,) = GLIGENLoader().run(ctx, "gligen_sd14_textbox_pruned.safetensors")
    assert GLIGENLoader().run(ctx, "gligen_sd14_textbox_pruned.safetensors")[0] is model  # one shared copy
    handle, clip, _ = CheckpointLoaderSimple().run(ctx, "mini_sd15.safetensors")
    return ctx, model, handle, clip


def test_a_file_that_is_not_gligen_is_refused_naming_it(loaded: Any) -> None:
    ctx = loaded[0]
    with pytest.raises(
        ValueError, match=r"GLIGENLoader: gligen_name: 'not_gligen.safetensors' is not a GLIGEN"
    ):
        GLIGENLoader().run(ctx, "not_gligen.safetensors")


def test_text_boxes_append_comfyuis_position_params(loaded: Any) -> None:
    """(pooled text, height // 8, width // 8, y // 8, x // 8) appended to each entry's `gligen`;
    the pooled text is CLIPTextEncode's pooled output (unprojected, the first end token)."""
    ctx, model, _, clip = loaded
    (positive,) = CLIPTextEncode().run(ctx, "a forest", clip)
    positive = positive + [(positive[0][0], {**positive[0][1], "strength": 0.5})]
    (one,) = GLIGENTextBoxApply().run(ctx, positive, clip, model, "red riding hood", 256, 496, 72, 8)
    (two,) = GLIGENTextBoxApply().run(ctx, one, clip, model, "wolf", 256, 448, 216, 32)
    assert "gligen" not in positive[0][1] and len(one[0][1]["gligen"][2]) == 1  # inputs are not changed
    for entry in two:
        kind, gligen, boxes = entry[1]["gligen"]
        assert kind == "position" and gligen is model
        assert [b[1:] for b in boxes] == [(62, 32, 1, 9), (56, 32, 4, 27)]
    assert two[1][1]["strength"] == 0.5 and two[1][0] is positive[0][0]
    (hood,) = CLIPTextEncode().run(ctx, "red riding hood", clip)
    assert torch.equal(two[0][1]["gligen"][2][0][0], hood[0][1]["pooled_output"])
    assert two[0][1]["gligen"][2][0][0].shape == (1, 768)


def test_sampling_with_a_text_box_differs_from_without(loaded: Any) -> None:
    ctx, model, handle, clip = loaded
    assert isinstance(model, GligenModel)
    (positive,) = CLIPTextEncode().run(ctx, "a forest", clip)
    (negative,) = CLIPTextEncode().run(ctx, "blurry", clip)
    (boxed,) = GLIGENTextBoxApply().run(ctx, positive, clip, model, "a wolf", 32, 32, 0, 0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    request = SamplingRequest(5, 2, 7.0, "euler", "normal")
    plain = sample(handle, positive, negative, latent, request)["samples"]
    with_box = sample(handle, boxed, negative, latent, request)["samples"]
    assert (with_box - plain).abs().max() > 0.05 * plain.abs().max()
