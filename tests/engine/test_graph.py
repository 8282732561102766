"""Loading workflows: API format, UI format (both link schemas) and PNG text chunks."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from engine_stubs import registry
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from nodegraph.graph import WorkflowError, load_workflow, png_text_chunks, ui_to_api

API = {
    "1": {"class_type": "Source", "inputs": {"value": 3, "mode": "a"}},
    "2": {"class_type": "Scale", "inputs": {"x": ["1", 0], "factor": 2.0}},
    "3": {"class_type": "Show", "inputs": {"x": ["2", 0]}},
}


def ui_node(
    node_id: int, kind: str, inputs: list[Any], outputs: list[Any], widgets: Any, mode: int = 0
) -> dict[str, Any]:
    return {
        "id": node_id, "type": kind, "pos": [0, 0], "size": [100, 50], "flags": {}, "order": node_id,
        "mode": mode, "inputs": inputs, "outputs": outputs, "properties": {"Node name for S&R": kind},
        "widgets_values": widgets,
    }  # fmt: skip


def inp(name: str, kind: str, link: int | None, widget: str | None = None) -> dict[str, Any]:
    return {"name": name, "type": kind, "link": link} | ({"widget": {"name": widget}} if widget else {})


def out(kind: str, links: list[int], widget: str | None = None) -> dict[str, Any]:
    return {"name": kind, "type": kind, "links": links} | ({"widget": {"name": widget}} if widget else {})


def ui_workflow() -> dict[str, Any]:
    """Source -> Reroute -> Scale (factor from a PrimitiveNode) -> bypassed Warn -> Show, plus a Note,
    a muted Show and a group; written as the stock frontend saves schema 0.4."""
    nodes = [
        ui_node(1, "Source", [], [out("NUMBER", [1, 6])], [3, "randomize", "a"]),
        ui_node(10, "Reroute", [inp("", "*", 1)], [out("NUMBER", [2])], []),
        ui_node(11, "PrimitiveNode", [], [out("FLOAT", [3], widget="factor")], [2.0]),
        ui_node(
            2,
            "Scale",
            [inp("x", "NUMBER", 2), inp("factor", "FLOAT", 3, "factor")],
            [out("NUMBER", [4])],
            [1.0],
        ),
        ui_node(12, "Warn", [inp("x", "NUMBER", 4)], [out("NUMBER", [5])], [], mode=4),
        ui_node(3, "Show", [inp("x", "NUMBER", 5)], [], []),
        ui_node(13, "Note", [], [], ["remember the milk"]),
        ui_node(14, "Show", [inp("x", "NUMBER", 6)], [], [], mode=2),
    ]
    links = [
        [1, 1, 0, 10, 0, "NUMBER"],
        [2, 10, 0, 2, 0, "NUMBER"],
        [3, 11, 0, 2, 1, "FLOAT"],
        [4, 2, 0, 12, 0, "NUMBER"],
        [5, 12, 0, 3, 0, "NUMBER"],
        [6, 1, 0, 14, 0, "NUMBER"],
    ]
    return {
        "last_node_id": 14, "last_link_id": 6, "nodes": nodes, "links": links,
        "groups": [{"title": "g", "bounding": [0, 0, 10, 10]}], "config": {}, "extra": {}, "version": 0.4,
    }  # fmt: skip


def inputs_of(prompt: dict[str, Any]) -> dict[str, Any]:
    return {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()}


def test_ui_workflow_converts_to_the_api_prompt() -> None:
    prompt = ui_to_api(ui_workflow(), registry())
    assert inputs_of(prompt) == inputs_of(API)
    assert prompt["2"]["_meta"] == {"title": "Scale"}


def test_schema_1_object_links() -> None:
    workflow = ui_workflow()
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, link, strict=True)) for link in workflow["links"]]
    workflow["version"] = 1
    assert inputs_of(ui_to_api(workflow, registry())) == inputs_of(API)


def test_widget_values_as_a_dict_and_titles() -> None:
    workflow = ui_workflow()
    workflow["nodes"][0]["widgets_values"] = {"value": 5, "mode": "b"}
    workflow["nodes"][0]["title"] = "My source"
    prompt = ui_to_api(workflow, registry())
    assert prompt["1"]["inputs"] == {"value": 5, "mode": "b"}
    assert prompt["1"]["_meta"]["title"] == "My source"


def test_muted_source_leaves_its_consumer_unlinked() -> None:
    workflow = ui_workflow()
    workflow["nodes"][0]["mode"] = 2
    prompt = ui_to_api(workflow, registry())
    assert "1" not in prompt and "x" not in prompt["2"]["inputs"]


def test_undriven_converted_widget_keeps_its_value() -> None:
    workflow = ui_workflow()
    workflow["nodes"][2]["outputs"][0]["links"] = []
    workflow["links"] = [link for link in workflow["links"] if link[0] != 3]
    workflow["nodes"][3]["inputs"][1]["link"] = None
    prompt = ui_to_api(workflow, registry())
    assert prompt["2"]["inputs"]["factor"] == 1.0  # the widget's own value when nothing drives it


def test_bypassed_node_without_an_input_link_leaves_the_consumer_unlinked() -> None:
    workflow = ui_workflow()
    workflow["nodes"][4]["inputs"][0]["link"] = None
    prompt = ui_to_api(workflow, registry())
    assert "12" not in prompt and "x" not in prompt["3"]["inputs"]


def test_every_unknown_node_type_is_named_at_once_with_its_pack() -> None:
    workflow = ui_workflow()
    workflow["nodes"][5]["type"] = "MysteryNode"
    workflow["nodes"][0]["type"] = "Seed (rgthree)"
    workflow["nodes"][3]["type"] = "FaceDetailer"
    workflow["nodes"][7]["type"] = "IPAdapterAdvanced"  # muted: not needed, not named
    with pytest.raises(WorkflowError) as caught:
        ui_to_api(workflow, registry())
    message = str(caught.value)
    assert "needs 3 node type(s) nodegraph does not have" in message
    assert "'Seed (rgthree)' (from the custom node pack rgthree-comfy)" in message
    assert "'FaceDetailer' (from the custom node pack ComfyUI-Impact-Pack)" in message
    assert "'MysteryNode' (from a custom node pack nodegraph does not know)" in message
    assert "MysteryNode at node 3" in message and "IPAdapter" not in message


def test_types_the_frontend_renames_on_load_are_converted_under_their_new_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ComfyUI_frontend's loadGraphData renames old types (`ConditioningAverage ` with its trailing
    space, `T2IAdapterLoader`) before queueing; the caller's workflow is left as it was read."""
    from nodegraph import graph

    assert graph.RENAMED_TYPES["ConditioningAverage "] == "ConditioningAverage"
    assert graph.RENAMED_TYPES["T2IAdapterLoader"] == "ControlNetLoader"
    monkeypatch.setitem(graph.RENAMED_TYPES, "Scale ", "Scale")
    workflow = ui_workflow()
    workflow["nodes"][3]["type"] = "Scale "
    prompt = ui_to_api(workflow, registry())
    assert prompt["2"]["class_type"] == "Scale" and prompt["2"]["inputs"]["factor"] == 2.0
    assert workflow["nodes"][3]["type"] == "Scale "


def test_a_core_node_nodegraph_lacks_is_not_blamed_on_a_custom_pack() -> None:
    workflow = ui_workflow()
    workflow["nodes"][0]["type"] = "CheckpointLoader"  # "Load Checkpoint With Config (DEPRECATED)"
    with pytest.raises(WorkflowError, match=r"'CheckpointLoader' \(a ComfyUI core node nodegraph does"):
        ui_to_api(workflow, registry())


def test_load_api_and_ui_json_files(tmp_path: Path) -> None:
    api_file = tmp_path / "api.json"
    api_file.write_text(json.dumps(API))
    ui_file = tmp_path / "ui.json"
    ui_file.write_text(json.dumps(ui_workflow()))
    api = load_workflow(api_file, registry())
    ui = load_workflow(str(ui_file), registry())
    assert (api.format, ui.format) == ("api", "ui")
    assert api.workflow is None and ui.workflow == ui_workflow()
    assert inputs_of(api.prompt) == inputs_of(ui.prompt)


def test_load_request_body_wrapper() -> None:
    body = {"prompt": copy.deepcopy(API), "extra_data": {"extra_pnginfo": {"workflow": {"nodes": []}}}}
    loaded = load_workflow(body, registry())
    assert (
        loaded.format == "api"
        and loaded.workflow == {"nodes": []}
        and inputs_of(loaded.prompt) == inputs_of(API)
    )


def write_png(path: Path, **chunks: str) -> None:
    info = PngInfo()
    for key, value in chunks.items():
        if key == "workflow":
            info.add_itxt(key, value, zip=True)  # compressed iTXt, as some tools write
        else:
            info.add_text(key, value)
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)


def test_png_uses_the_workflow_chunk_before_a_stale_prompt(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    stale = copy.deepcopy(API)
    stale["2"]["inputs"]["factor"] = 9.0  # what an older save wrote; the workflow says 2.0
    write_png(path, prompt=json.dumps(stale), workflow=json.dumps(ui_workflow()))
    assert set(png_text_chunks(path.read_bytes())) == {"prompt", "workflow"}
    loaded = load_workflow(path, registry())
    assert loaded.format == "png" and loaded.workflow == ui_workflow()
    assert inputs_of(loaded.prompt) == inputs_of(API)


def test_png_with_only_a_prompt_uses_it(tmp_path: Path) -> None:
    path = tmp_path / "api.png"
    write_png(path, prompt=json.dumps(API))
    loaded = load_workflow(path, registry())
    assert loaded.workflow is None and inputs_of(loaded.prompt) == inputs_of(API)


def test_png_with_only_a_workflow_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "ui.png"
    write_png(path, workflow=json.dumps(ui_workflow()))
    assert inputs_of(load_workflow(path.read_bytes(), registry()).prompt) == inputs_of(API)


def test_png_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(WorkflowError, match="without a 'prompt' or 'workflow'"):
        load_workflow(path, registry())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"1": 5}', "node '1' is a int"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(WorkflowError, match=message):
        load_workflow(path, registry())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="cannot read workflow file"):
        load_workflow(tmp_path / "nope.json", registry())


def test_dynamic_prompt_widgets_are_rewritten_like_the_canvas_does() -> None:
    workflow = {
        "nodes": [
            ui_node(1, "Word", [], [out("WORD", [])], ["a {red|red} cat // note\n/* x */done \\{kept\\}"])
        ],
        "links": [],
    }
    assert ui_to_api(workflow, registry())["1"]["inputs"]["text"] == "a red cat \ndone {kept}"


def test_dynamic_prompt_choices_and_escapes() -> None:
    import random

    from nodegraph.dynamic_prompts import dynamic_prompt

    rng = random.Random(0)
    seen = {dynamic_prompt("{a|b|{c|d}}", rng) for _ in range(200)}
    assert seen == {"a", "b", "c", "d"}
    assert dynamic_prompt(r"\(word:1.2\) \| x", rng) == r"\(word:1.2\) | x"  # weight escapes survive


def test_dynamic_prompts_are_one_pass_and_bounded() -> None:
    """The frontend's comment regex rescanned the rest of the text at every unclosed `/*` (60 KB took
    7 s, this text minutes) and the expansion recursed once per nested `{` (a RecursionError)."""
    from nodegraph.dynamic_prompts import MAX_NESTING, DynamicPromptError, dynamic_prompt

    text = "/*x" * 100_000
    assert dynamic_prompt(text) == text  # an unclosed comment is text, as the frontend leaves it
    assert dynamic_prompt("{" * 50 + "a" * 1_000_000 + "}" * 50) == "a" * 1_000_000
    with pytest.raises(DynamicPromptError, match=f"deeper than {MAX_NESTING} levels"):
        dynamic_prompt("{" * 3000 + "}" * 3000)
    workflow = {"nodes": [ui_node(1, "Word", [], [out("WORD", [])], ["{" * 3000])], "links": []}
    with pytest.raises(WorkflowError, match=r"node 1 \(Word\) is malformed.*deeper than"):
        ui_to_api(workflow, registry())


def test_missing_widget_values_take_defaults() -> None:
    workflow = ui_workflow()
    workflow["nodes"][0]["widgets_values"] = [7]
    assert ui_to_api(workflow, registry())["1"]["inputs"] == {"value": 7, "mode": "a"}


def link_obj(link_id: int, origin: int, oslot: int, target: int, tslot: int, kind: str) -> dict[str, Any]:
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return dict(zip(keys, (link_id, origin, oslot, target, tslot, kind), strict=True))


SCALE_SUBGRAPH = {
    "id": "sub-scale",
    "name": "Scale it",
    "inputs": [
        {"name": "x", "type": "NUMBER", "linkIds": [101]},
        {"name": "factor", "type": "FLOAT", "linkIds": [102]},
    ],
    "outputs": [{"name": "out", "type": "NUMBER", "linkIds": [103]}],
    "nodes": [
        ui_node(
            1,
            "Scale",
            [inp("x", "NUMBER", 101), inp("factor", "FLOAT", 102, "factor")],
            [out("NUMBER", [103])],
            [1.0],
        )
    ],
    "links": [
        link_obj(101, -10, 0, 1, 0, "NUMBER"),
        link_obj(102, -10, 1, 1, 1, "FLOAT"),
        link_obj(103, 1, 0, -20, 0, "NUMBER"),
    ],
}


def subgraph_workflow(instance_type: str = "sub-scale", mode: int = 0) -> dict[str, Any]:
    """Source(1) -> [subgraph instance 5: Scale inside, factor promoted as a widget] -> Show(3)."""
    nodes = [
        ui_node(1, "Source", [], [out("NUMBER", [1])], [3, "fixed", "a"]),
        ui_node(
            5, instance_type, [inp("x", "NUMBER", 1), inp("factor", "FLOAT", None, "factor")], [], [2.0], mode
        ),
        ui_node(3, "Show", [inp("x", "NUMBER", 2)], [], []),
    ]
    nodes[1]["outputs"] = [out("NUMBER", [2])]
    links = [[1, 1, 0, 5, 0, "NUMBER"], [2, 5, 0, 3, 0, "NUMBER"]]
    return {"nodes": nodes, "links": links, "definitions": {"subgraphs": [SCALE_SUBGRAPH]}, "version": 0.4}


def test_subgraph_instances_are_flattened_under_prefixed_ids() -> None:
    prompt = ui_to_api(subgraph_workflow(), registry())
    assert inputs_of(prompt) == {
        "1": ("Source", {"value": 3, "mode": "a"}),
        "5:1": ("Scale", {"x": ["1", 0], "factor": 2.0}),  # the promoted widget's value
        "3": ("Show", {"x": ["5:1", 0]}),
    }


def test_nested_subgraphs() -> None:
    workflow = subgraph_workflow("sub-outer")
    outer = {
        "id": "sub-outer",
        "inputs": [{"name": "x", "type": "NUMBER"}, {"name": "factor", "type": "FLOAT"}],
        "outputs": [{"name": "out", "type": "NUMBER"}],
        "nodes": [ui_node(7, "sub-scale", [inp("x", "NUMBER", 11), inp("factor", "FLOAT", 12)], [], [])],
        "links": [
            link_obj(11, -10, 0, 7, 0, "NUMBER"),
            link_obj(12, -10, 1, 7, 1, "FLOAT"),
            link_obj(13, 7, 0, -20, 0, "NUMBER"),
        ],
    }
    workflow["definitions"]["subgraphs"].append(outer)
    prompt = ui_to_api(workflow, registry())
    assert inputs_of(prompt)["5:7:1"] == ("Scale", {"x": ["1", 0], "factor": 2.0})
    assert prompt["3"]["inputs"] == {"x": ["5:7:1", 0]}


def test_muted_subgraph_unlinks_its_consumers() -> None:
    prompt = ui_to_api(subgraph_workflow(mode=2), registry())
    assert set(prompt) == {"1", "3"} and prompt["3"]["inputs"] == {}


def test_bypassed_subgraph_passes_its_input_through() -> None:
    prompt = ui_to_api(subgraph_workflow(mode=4), registry())
    assert prompt["3"]["inputs"] == {"x": ["1", 0]}


def test_malformed_ui_link_and_node() -> None:
    workflow = ui_workflow()
    workflow["links"][0] = [1, 1, "zero", 10, 0, "NUMBER"]
    with pytest.raises(WorkflowError, match="malformed link"):
        ui_to_api(workflow, registry())
    workflow = ui_workflow()
    workflow["nodes"][3]["inputs"][0] = {"name": "x", "type": "NUMBER", "link": "two"}
    with pytest.raises(WorkflowError, match=r"node 2 \(Scale\) is malformed"):
        ui_to_api(workflow, registry())


def test_widget_converted_to_a_socket_takes_its_link(tmp_path: Path) -> None:
    workflow = ui_workflow()
    workflow["nodes"].append(ui_node(20, "Ratio", [], [out("FLOAT", [30])], [4.0]))
    workflow["links"].append([30, 20, 0, 2, 1, "FLOAT"])
    workflow["nodes"][3]["inputs"][1]["link"] = 30  # Scale.factor now comes from Ratio, not the Primitive
    prompt = ui_to_api(workflow, registry())
    assert prompt["2"]["inputs"]["factor"] == ["20", 0]
    assert prompt["20"]["inputs"] == {"value": 4.0}
    from engine_stubs import environment

    from nodegraph.validate import validate_prompt

    assert validate_prompt(prompt, registry(), environment(tmp_path)).node_errors == {}


def test_ui_and_api_forms_are_the_same_graph_to_the_executor(tmp_path: Path) -> None:
    from engine_stubs import environment

    from nodegraph.executor import Executor
    from nodegraph.validate import validate_prompt

    executor = Executor(registry(), environment(tmp_path))
    for prompt in (copy.deepcopy(API), ui_to_api(ui_workflow(), registry())):
        checked = validate_prompt(prompt, executor.registry, executor.env)
        outcome = executor.execute(checked.prompt, "p", lambda event: None, outputs=checked.outputs)
    assert outcome.status == "success" and outcome.executed == []  # the UI form hit every cache entry
    assert outcome.outputs == {"3": {"values": [6.0]}}
