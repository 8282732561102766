"""The canvas gives rgthree's Power Lora Loader its rows (web/power_lora.js): a saved rgthree node opens
with its rows, toggling, adding (through the LoRA picker) and the model & clip mode change what the
canvas queues, and the node saves and reopens in rgthree's own layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.conftest import KNOWN_PAGE_ERRORS, Session

WEB = Path(__file__).resolve().parents[2] / "web"
POWER = "Power Lora Loader (rgthree)"
HEADER = {"type": "PowerLoraLoaderHeaderWidget"}
NODE = 99


def graph_with_power_lora() -> dict[str, Any]:
    graph: dict[str, Any] = json.loads((WEB / "default_workflow.json").read_text())
    graph["nodes"].append(
        {
            "id": NODE, "type": POWER, "pos": [40, 700], "size": [360, 160], "flags": {}, "order": 20,
            "mode": 0,
            "inputs": [{"name": n, "type": n.upper(), "link": None} for n in ("model", "clip")],
            "outputs": [{"name": n, "type": n, "links": []} for n in ("MODEL", "CLIP")],
            "properties": {"Show Strengths": "Single Strength"},
            "widgets_values": [
                {}, HEADER,
                {"on": True, "lora": "mini_lora_a.safetensors", "strength": 0.8, "strengthTwo": None},
                {"on": False, "lora": "mini_lora_b.safetensors", "strength": 1, "strengthTwo": None},
                {}, "",
            ],
        }
    )  # fmt: skip
    graph["last_node_id"] = max(graph.get("last_node_id", 0), NODE)
    return graph


def queued_inputs(canvas: Session) -> dict[str, Any]:
    inputs: dict[str, Any] = canvas.js(f"async () => (await app.graphToPrompt()).output['{NODE}'].inputs")
    return {k: v for k, v in inputs.items() if k.startswith("lora_")}


def test_power_lora_loader_rows_toggle_add_and_save(canvas: Session) -> None:
    page = canvas.page
    canvas.js("g => app.loadGraphData(g)", graph_with_power_lora())
    page.wait_for_function("() => document.querySelectorAll('.nodegraph-power-row').length === 2")
    assert queued_inputs(canvas) == {
        "lora_1": {"on": True, "lora": "mini_lora_a.safetensors", "strength": 0.8},
        "lora_2": {"on": False, "lora": "mini_lora_b.safetensors", "strength": 1},
    }
    # switch the first row off with its checkbox, then add a LoRA with the button and the picker
    page.locator(".nodegraph-power-row input[type=checkbox]").first.click()
    page.locator(".nodegraph-power-add").click()
    page.wait_for_selector(".nodegraph-picker input")
    page.fill(".nodegraph-picker input", "lora_b")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.nodegraph-power-row').length === 3")
    rows = queued_inputs(canvas)
    assert rows["lora_1"]["on"] is False
    assert rows["lora_3"] == {"on": True, "lora": "mini_lora_b.safetensors", "strength": 1}
    # model & clip mode: every row sends a clip strength too
    page.locator(".nodegraph-power-mode input").click()
    assert all(row["strengthTwo"] == row["strength"] for row in queued_inputs(canvas).values())
    saved = canvas.js(f"() => app.graph.getNodeById({NODE}).serialize()")
    values = saved["widgets_values"]
    assert values[:2] == [{}, HEADER] and values[-2:] == [{}, ""]
    names = [v["lora"] for v in values[2:-2]]
    assert names == ["mini_lora_a.safetensors", "mini_lora_b.safetensors", "mini_lora_b.safetensors"]
    assert saved["properties"]["Show Strengths"] == "Separate Model & Clip"
    # reopening the saved graph brings the three rows back
    canvas.js("() => app.loadGraphData(app.graph.serialize())")
    page.wait_for_function("() => document.querySelectorAll('.nodegraph-power-row').length === 3")
    assert [r["on"] for r in queued_inputs(canvas).values()] == [False, False, True]
    unexpected = [e for e in canvas.page_errors if not any(k in e for k in KNOWN_PAGE_ERRORS)]
    assert not unexpected, unexpected
