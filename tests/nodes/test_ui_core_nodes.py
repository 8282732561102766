"""A UI-format workflow for the real core nodes converts to the oracle's API workflow.

This file imports the SD node declarations (and so torch) to read their widget order: it checks
that the UI conversion matches ComfyUI's schemas for KSampler (seed + control_after_generate),
CLIPTextEncode, EmptyLatentImage and the loaders. Nothing is run.
"""

from __future__ import annotations

from pathlib import Path

from nodegraph.graph import load_workflow
from nodegraph.registry import Registry
from tests.conftest import ORACLE

DATA = Path(__file__).resolve().parent / "data"
WORKFLOWS = ORACLE / "workflows"
# UI node id -> the oracle's API node id
IDS = {"4": "ckpt", "6": "pos", "7": "neg", "5": "latent", "3": "ksampler", "8": "decode", "9": "save_image"}
IDS["10"] = "save_latent"


def test_ui_baseline_equals_the_api_baseline() -> None:
    from nodes import all_nodes

    registry = Registry(all_nodes())
    ui = load_workflow(DATA / "baseline_ui.json", registry)
    api = load_workflow(WORKFLOWS / "baseline.json", registry)
    assert ui.format == "ui" and ui.workflow is not None
    renamed = {}
    for node_id, node in ui.prompt.items():
        inputs = {k: [IDS[v[0]], v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        renamed[IDS[node_id]] = {"class_type": node["class_type"], "inputs": inputs}
    expected = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.prompt.items()}
    assert renamed == expected  # 7 == 7.0: JSON from the canvas writes whole floats as integers
    assert ui.prompt["6"]["_meta"]["title"] == "Positive"
