"""RebatchLatents and RebatchImages: ComfyUI's regrouping rules, and a graph where the nodes after
them run once per batch (ComfyUI's list semantics in the executor)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nodegraph.engine import Settings, build_engine
from nodes import all_nodes
from nodes.rebatch import RebatchImages, RebatchLatents, rebatch_latents
from nodes.sd.values import Latent


def _latent(batch: int, size: int, seed: int, **extra: Any) -> Latent:
    samples = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))
    return {"samples": samples, **extra}  # type: ignore[typeddict-item]


def test_latents_are_regrouped_by_size_and_batch_size() -> None:
    a, b, c = _latent(4, 8, 1), _latent(3, 8, 2), _latent(2, 16, 3)
    out = rebatch_latents([a, b, c], 3)
    assert [o["samples"].shape[0] for o in out] == [3, 3, 1, 2]
    assert [o["batch_index"] for o in out] == [[0, 1, 2], [3, 4, 5], [6], [7, 8]]
    same = torch.cat([a["samples"], b["samples"]])
    assert torch.equal(out[0]["samples"], same[:3]) and torch.equal(out[1]["samples"], same[3:6])
    assert torch.equal(out[2]["samples"], same[6:]) and torch.equal(out[3]["samples"], c["samples"])
    assert all("noise_mask" not in o for o in out)  # no input had one: the all-ones masks go


def test_noise_masks_and_batch_indices_are_kept() -> None:
    mask = torch.zeros(1, 1, 64, 64)
    a = _latent(2, 8, 1, batch_index=[7, 9])
    b = _latent(2, 8, 2, noise_mask=mask)  # one mask for the batch: cycled to two
    out = rebatch_latents([a, b], 4)
    assert len(out) == 1 and out[0]["batch_index"] == [7, 9, 2, 3]
    got = out[0]["noise_mask"]
    assert got.shape == (4, 1, 64, 64) and got[:2].eq(1).all() and got[2:].eq(0).all()
    (via_node,) = RebatchLatents().run(None, [a, b], [4])  # type: ignore[arg-type]
    assert torch.equal(via_node[0]["samples"], out[0]["samples"])


def test_images_are_split_into_batches() -> None:
    images = [torch.rand(3, 8, 8, 3), torch.rand(2, 8, 8, 3)]
    (out,) = RebatchImages().run(None, images, [2])  # type: ignore[arg-type]
    assert [o.shape[0] for o in out] == [2, 2, 1]
    assert torch.equal(torch.cat(out), torch.cat(images))
    info = RebatchImages.info(None)
    assert info["output_is_list"] == [True] and info["display_name"] == "Rebatch Images"


def test_nodes_after_a_rebatch_run_once_per_batch(tmp_path: Path) -> None:
    engine = build_engine(Settings(base_directory=tmp_path, preview_method="none"), all_nodes())
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 5, "color": 0xFF0000},
        },
        "2": {"class_type": "RebatchImages", "inputs": {"images": ["1", 0], "batch_size": 2}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "rebatched"}},
    }
    events: list[Any] = []
    from nodegraph.validate import validate_prompt

    checked = validate_prompt(prompt, engine.executor.registry, engine.env)
    assert checked.ok, checked.node_errors
    outcome = engine.executor.execute(checked.graph or checked.prompt, "p", events.append)
    assert outcome.status == "success", outcome.error
    images = outcome.outputs["4"]["images"]
    assert len(images) == 5  # three SaveImage calls (2 + 2 + 1), one message listing every file
    assert len({i["filename"] for i in images}) == 5
