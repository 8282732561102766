"""`/object_info` for the nodes ComfyUI has equals one reviewed snapshot of ComfyUI's declarations.

`tests/data/comfyui_object_info.json` holds, per node, what the canvas reads from `/object_info`
(ids, inputs with their options and order, outputs, names, display names, categories) on empty
model folders; `description` is left out (ours is the node's docstring, not ComfyUI's text). It was
written once from our declarations and reviewed against ComfyUI's (`../shared/reference/comfyui.md`
§2 and the comfy_extras sources it cites); it replaces the hand-copied declaration tests. A change
to a declaration fails here: check it against ComfyUI, then rewrite the snapshot with
`python -m tests.nodes.test_object_info --write` and review the diff.

Nodes ComfyUI does not have (ours, and the custom-node packs' LoRA loaders) are listed in
`NOT_COMFYUI`; every other node must be in the snapshot. `tests/data/comfyui_node_ids.json` holds
every node id ComfyUI 0.3.64 registers, so that list cannot hide a node ComfyUI has: each node we
register that ComfyUI also has is compared.

Review against ComfyUI 0.3.64 (a125cd84; ComfyUI's own `node_info` run over its source, all 117
entries, the 30 added in b9ea859 included): inputs, their options and order, outputs and categories
agree everywhere, up to forms the canvas reads alike (`["MODEL"]` for `["MODEL", {}]`, a V3 node's
`["COMBO", {"options": [...]}]` for `[[...], {}]`, an INT's `step` 1, a STRING's `default` "").
Known differences, left as they are:
- display names: 0.3.64 sends none for the V3 nodes ImageBlend, ImageBlur, ImageQuantize,
  ImageSharpen and ImageScaleToTotalPixels, and "BasicGuider", "CFGGuider", "DualCFGGuider" for
  the guiders; ours are later ComfyUI's ("Image Blend", "Image Blur", "Basic Guider", ...) or our
  own ("Image Quantize", "Image Sharpen", "Scale Image to Total Pixels"). The canvas shows its
  locale's names for all of them.
- GetImageSize: ComfyUI has a hidden `unique_id` input (it reports the size as node text); we do not.
- LoraLoaderModelOnly: ComfyUI inherits LoraLoader's two `output_tooltips` for its one output; we
  send none.
- ModelSamplingDiscrete: ComfyUI's `sampling` also offers "img_to_img"; we do not implement it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.registry import Registry
from nodes import all_nodes

SNAPSHOT = Path(__file__).resolve().parents[1] / "data" / "comfyui_object_info.json"
COMFYUI_IDS = Path(__file__).resolve().parents[1] / "data" / "comfyui_node_ids.json"
NOT_COMFYUI = frozenset(
    {
        "LoraTagLoader",  # nodegraph's <lora:name:weight> prompt tags
        "TrainLora",  # nodegraph's LoRA trainer as a node
        # custom-node packs' LoRA loaders (rgthree, Efficiency Nodes, Comfyroll): their declarations
        # are checked against those packs in tests/nodes/test_lora_stacks.py
        "Power Lora Loader (rgthree)",
        "Lora Loader Stack (rgthree)",
        "LoRA Stacker",
        "CR LoRA Stack",
        "CR Apply LoRA Stack",
    }
)
LEFT_OUT = ("description",)


def declarations(base: Path) -> dict[str, dict[str, Any]]:
    """Our `/object_info` (as the wire carries it) for ComfyUI's nodes, on empty folders under `base`."""
    info = Registry(all_nodes()).object_info(Environment(Folders.at(base)))
    wire: dict[str, dict[str, Any]] = json.loads(json.dumps(info))
    return {
        node_id: {k: v for k, v in entry.items() if k not in LEFT_OUT}
        for node_id, entry in wire.items()
        if node_id not in NOT_COMFYUI
    }


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return declarations(tmp_path_factory.mktemp("object_info"))


@pytest.fixture(scope="module")
def snapshot() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    return loaded


def test_every_comfyui_node_is_in_the_snapshot(ours: dict[str, Any], snapshot: dict[str, Any]) -> None:
    assert sorted(set(ours) - set(snapshot)) == [], "new nodes: review them and rewrite the snapshot"
    assert sorted(set(snapshot) - set(ours)) == [], "nodes gone from /object_info"


def test_nodes_left_out_of_the_snapshot_are_not_comfyuis() -> None:
    comfyui = set(json.loads(COMFYUI_IDS.read_text(encoding="utf-8"))["ids"])
    assert len(comfyui) > 400 and {"KSampler", "LoraLoader", "ImageBlend"} <= comfyui
    assert sorted(NOT_COMFYUI & comfyui) == [], "ComfyUI has these: compare them in the snapshot"
    registered = {cls.NODE_ID for cls in all_nodes()}
    assert sorted(NOT_COMFYUI - registered) == [], "listed but not registered"


def _snapshot_ids() -> list[str]:
    return sorted(json.loads(SNAPSHOT.read_text(encoding="utf-8"))) if SNAPSHOT.is_file() else []


@pytest.mark.parametrize("node_id", _snapshot_ids())
def test_declaration_is_the_reviewed_one(
    ours: dict[str, Any], snapshot: dict[str, Any], node_id: str
) -> None:
    assert ours.get(node_id) == snapshot[node_id]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    with tempfile.TemporaryDirectory() as tmp:
        SNAPSHOT.write_text(
            json.dumps(declarations(Path(tmp)), indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
    print(f"wrote {SNAPSHOT}")
