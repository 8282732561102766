"""The custom-node packs' LoRA nodes: declarations as the packs declare them, rgthree's canvas rows
converted as its frontend sends them, row validation and name matching. Nothing is sampled here
(tests/nodes/test_lora_stack_workflows.py runs them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodegraph.env import Environment
from nodegraph.folders import Folders
from nodegraph.graph import ui_to_api
from nodegraph.registry import Registry
from nodegraph.validate import validate_prompt
from nodes import all_nodes
from nodes.lora_rows import match_lora, power_rows

REGISTRY = Registry(all_nodes())
POWER = "Power Lora Loader (rgthree)"
HEADER = {"type": "PowerLoraLoaderHeaderWidget"}


def _spec(node_id: str) -> dict[str, Any]:
    cls = REGISTRY.get(node_id)
    assert cls is not None, node_id
    return cls.info(None)


def test_declarations_follow_the_packs() -> None:
    power = _spec(POWER)
    assert power["input"] == {"required": {}, "optional": {"model": ["MODEL", {}], "clip": ["CLIP", {}]}}
    assert (power["output"], power["output_name"], power["category"]) == (
        ["MODEL", "CLIP"],
        ["MODEL", "CLIP"],
        "rgthree",
    )
    stack = _spec("Lora Loader Stack (rgthree)")
    assert stack["input_order"]["required"] == [
        "model", "clip", "lora_01", "strength_01", "lora_02", "strength_02",
        "lora_03", "strength_03", "lora_04", "strength_04",
    ]  # fmt: skip
    assert stack["input"]["required"]["strength_01"][1] == {
        "default": 1.0,
        "min": -10.0,
        "max": 10.0,
        "step": 0.01,
    }
    stacker = _spec("LoRA Stacker")
    order = stacker["input_order"]["required"]
    assert order[:6] == ["input_mode", "lora_count", "lora_name_1", "lora_wt_1", "model_str_1", "clip_str_1"]
    assert len(order) == 2 + 49 * 4 and order[-1] == "clip_str_49"
    assert stacker["input"]["required"]["lora_count"][1] == {"default": 3, "min": 0, "max": 50, "step": 1}
    assert stacker["input"]["optional"] == {"lora_stack": ["LORA_STACK", {}]}
    assert (stacker["output"], stacker["category"]) == (["LORA_STACK"], "Efficiency Nodes/Stackers")
    cr = _spec("CR LoRA Stack")
    assert cr["input_order"]["required"][:4] == ["switch_1", "lora_name_1", "model_weight_1", "clip_weight_1"]
    assert cr["input"]["required"]["switch_1"] == [["Off", "On"], {}]
    assert (cr["output"], cr["output_name"]) == (["LORA_STACK", "STRING"], ["LORA_STACK", "show_help"])
    apply = _spec("CR Apply LoRA Stack")
    assert apply["input_order"]["required"] == ["model", "clip", "lora_stack"]
    assert apply["output_name"] == ["MODEL", "CLIP", "show_help"]


def _power_node(rows: list[dict[str, Any]], properties: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": 11,
        "type": POWER,
        "mode": 0,
        "inputs": [],
        "outputs": [
            {"name": "MODEL", "type": "MODEL", "links": []},
            {"name": "CLIP", "type": "CLIP", "links": []},
        ],
        "properties": properties or {"Show Strengths": "Single Strength"},
        "widgets_values": [{}, HEADER, *rows, {}, ""],
    }


def test_power_rows_convert_as_rgthree_serialises_them() -> None:
    rows = [
        {"on": True, "lora": "a.safetensors", "strength": 0.8, "strengthTwo": None},
        {"on": False, "lora": "b.safetensors", "strength": 1, "strengthTwo": 0.3},
    ]
    single = ui_to_api({"nodes": [_power_node(rows)], "links": []}, REGISTRY)["11"]["inputs"]
    assert single == {
        "PowerLoraLoaderHeaderWidget": HEADER,
        "lora_1": {"on": True, "lora": "a.safetensors", "strength": 0.8},
        "lora_2": {"on": False, "lora": "b.safetensors", "strength": 1},
        "➕ Add Lora": "",
    }
    separate = _power_node(rows, {"Show Strengths": "Separate Model & Clip"})
    both = ui_to_api({"nodes": [separate], "links": []}, REGISTRY)["11"]["inputs"]
    assert both["lora_1"]["strengthTwo"] == 1 and both["lora_2"]["strengthTwo"] == 0.3


def test_efficiency_stacker_first_version_reads_as_three_simple_slots() -> None:
    node = {
        "id": 3, "type": "LoRA Stacker", "mode": 0, "inputs": [], "outputs": [],
        "widgets_values": ["a.safetensors", 0.7, "None", 1.0, "b.safetensors", 0.4],
    }  # fmt: skip
    inputs = ui_to_api({"nodes": [node], "links": []}, REGISTRY)["3"]["inputs"]
    assert (inputs["input_mode"], inputs["lora_count"]) == ("simple", 3)
    assert (inputs["lora_name_1"], inputs["lora_wt_1"], inputs["lora_name_3"], inputs["lora_wt_3"]) == (
        "a.safetensors", 0.7, "b.safetensors", 0.4,
    )  # fmt: skip
    assert inputs["lora_name_49"] == "None" and inputs["clip_str_49"] == 1.0


NAMES = ["style/Mini_Lora_B.safetensors", "mini_lora_a.safetensors", "x/detail-v2.pt"]


@pytest.mark.parametrize(
    ("wanted", "found"),
    [
        ("mini_lora_a.safetensors", "mini_lora_a.safetensors"),  # exact
        ("mini_lora_a", "mini_lora_a.safetensors"),  # without extension
        ("Mini_Lora_B.safetensors", "style/Mini_Lora_B.safetensors"),  # by file name
        ("other/Mini_Lora_B.safetensors", "style/Mini_Lora_B.safetensors"),  # file name of another path
        ("detail-v2", "x/detail-v2.pt"),  # file name without extension
        ("detail", "x/detail-v2.pt"),  # rgthree's last resort: a substring
        ("absent", None),
    ],
)
def test_row_names_match_as_rgthree_matches_them(wanted: str, found: str | None) -> None:
    assert match_lora(NAMES, wanted) == found


def test_rows_apply_only_when_on_with_a_strength_and_a_lora() -> None:
    rows = {
        "PowerLoraLoaderHeaderWidget": HEADER,
        "lora_1": {"on": True, "lora": "mini_lora_a", "strength": 0.5, "strengthTwo": 0.2},
        "lora_2": {"on": False, "lora": "absent", "strength": 1},  # off: never looked up
        "lora_3": {"on": True, "lora": "mini_lora_a", "strength": 0},  # both strengths 0
        "lora_4": {"on": True, "lora": None, "strength": 1},  # no LoRA picked yet
        "lora_5": {"on": True, "lora": "Mini_Lora_B", "strength": 0.7},
        "➕ Add Lora": "",
    }
    applied = power_rows(rows, NAMES, has_clip=True)
    assert [(r.key, r.file, r.strengths) for r in applied] == [
        ("lora_1", "mini_lora_a.safetensors", (0.5, 0.2)),
        ("lora_5", "style/Mini_Lora_B.safetensors", (0.7, 0.7)),
    ]
    no_clip = power_rows(rows, NAMES, has_clip=False)
    assert [(r.strengths, r.clip_ignored) for r in no_clip] == [((0.5, 0.0), True), ((0.7, 0.0), False)]


@pytest.fixture
def lora_env(tmp_path: Path) -> Environment:
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "mini_lora_a.safetensors").write_bytes(b"not read by validation")
    return Environment(Folders.at(tmp_path))


def _power_prompt(rows: dict[str, Any]) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "2": {"class_type": POWER, "inputs": {"model": ["1", 0], "clip": ["1", 1], **rows}},
        "3": {
            "class_type": "CheckpointSave",
            "inputs": {"model": ["2", 0], "clip": ["2", 1], "vae": ["1", 2], "filename_prefix": "x"},
        },
    }


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"on": True, "lora": "missing.safetensors", "strength": 1},
            "lora_1: no LoRA named 'missing.safetensors'",
        ),
        ({"on": True, "lora": "mini_lora_a", "strength": "lots"}, "lora_1: strength 'lots' is not a number"),
        ({"on": True, "strength": 1}, "lora_1 has no 'lora'"),
    ],
)
def test_a_bad_row_fails_validation_naming_it(
    lora_env: Environment, row: dict[str, Any], message: str
) -> None:
    checked = validate_prompt(_power_prompt({"lora_1": row}), REGISTRY, lora_env)
    errors = checked.node_errors["2"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed" and message in errors[0]["details"]


def test_an_off_row_naming_a_missing_lora_does_not_fail(lora_env: Environment) -> None:
    rows = {"lora_1": {"on": False, "lora": "missing.safetensors", "strength": 1}}
    checked = validate_prompt(_power_prompt(rows), REGISTRY, lora_env)
    assert "2" not in checked.node_errors
