"""Canny: ComfyUI's declaration, and its edges equal kornia's (which ComfyUI calls) bit for bit."""

from __future__ import annotations

import kornia
import numpy as np
import pytest
import torch
from PIL import Image

from nodegraph.env import Environment
from nodegraph.testing import RecordingContext
from nodes import all_nodes
from nodes.preprocessors import Canny
from tests.conftest import ORACLE


def test_declaration_matches_comfyui() -> None:
    info = {cls.NODE_ID: cls for cls in all_nodes()}["Canny"].info(None)
    required = info["input"]["required"]
    assert list(required) == ["image", "low_threshold", "high_threshold"] and required["image"][0] == "IMAGE"
    for name, default in (("low_threshold", 0.4), ("high_threshold", 0.8)):
        kind, options = required[name][:2]
        assert kind == "FLOAT"
        assert {k: options[k] for k in ("default", "min", "max", "step")} == {
            "default": default, "min": 0.01, "max": 0.99, "step": 0.01
        }  # fmt: skip
    assert (info["output"], info["category"]) == (["IMAGE"], "image/preprocessors")


def _images() -> list[torch.Tensor]:
    photo = np.asarray(Image.open(ORACLE / "workflows" / "init_64.png").convert("RGB"), np.float32) / 255.0
    gen = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.rand(1, 3, 12, 10, generator=gen), size=(72, 60), mode="bilinear"
    )
    return [torch.from_numpy(photo)[None], torch.rand(2, 37, 51, 3, generator=gen), smooth.movedim(1, -1)]


@pytest.mark.parametrize(("low", "high"), [(0.4, 0.8), (0.1, 0.2), (0.05, 0.3), (0.5, 0.5), (0.01, 0.99)])
def test_edges_equal_kornias(env: Environment, low: float, high: float) -> None:
    for image in _images():
        (out,) = Canny().run(RecordingContext(env), image, low, high)
        want = kornia.filters.canny(image.movedim(-1, 1), low, high)[1].repeat(1, 3, 1, 1).movedim(1, -1)
        assert out.shape == image.shape[:3] + (3,) and torch.equal(out, want)


def test_a_step_gives_one_line_and_bad_thresholds_are_named(env: Environment) -> None:
    step = torch.zeros(1, 16, 16, 3)
    step[:, :, 8:] = 1.0
    (out,) = Canny().run(RecordingContext(env), step, 0.4, 0.8)
    columns = out[0, :, :, 0].sum(0)
    assert columns.nonzero().flatten().tolist() in ([7], [8]) and float(columns.max()) == 16
    with pytest.raises(ValueError, match="low_threshold"):
        Canny().run(RecordingContext(env), step, 0.9, 0.2)
