"""The canvas end to end: ComfyUI's frontend in headless Chromium against the real server and nodes.

The tests share one page and run in file order, like one person's session: the default graph draws,
the LoRA panel works, a LoRA is added from the search box and wired, the prompt runs on the mini
model (64x64, 2 steps) with progress and an image, the workflow saves and reopens, PNGs load.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.e2e.conftest import KNOWN_PAGE_ERRORS, Session

WEB = Path(__file__).resolve().parents[2] / "web"
# The node search box: 1.27's PrimeVue autocomplete, and the dialog that replaced it (1.4x+).
NODE_SEARCH_INPUT = "input[placeholder='Search Nodes...'], [role='search'] input[role='combobox']"
# Where 1.27 and 1.58 draw the same things: the queue panel (a sidebar tab in 1.27, the job queue
# overlay in 1.58), dialogs (PrimeVue, then reka) and toasts.
QUEUE_PANEL_BUTTON = ".queue-tab-button, [data-testid='queue-overlay-toggle']"
QUEUE_PANEL_IMAGE = ".task-output-image, [data-testid='job-assets-list'] img"
DIALOG = ".p-dialog, [role='dialog']"
DIALOG_INPUT = ".p-dialog input, [role='dialog'] input"
IMAGE_SHOWN = """() => { const n = app.graph.nodes.find(n => n.type === 'SaveImage');
  return !!(n && n.imgs && n.imgs[0] && n.imgs[0].complete && n.imgs[0].naturalWidth > 0) }"""


def graph_without_lora() -> dict[str, Any]:
    """Our default workflow with its LoRA loader taken out: the checkpoint feeds sampler and encoders."""
    graph = json.loads((WEB / "default_workflow.json").read_text())
    lora = next(n for n in graph["nodes"] if n["type"] == "LoraLoader")
    ckpt = next(n for n in graph["nodes"] if n["type"] == "CheckpointLoaderSimple")
    graph["nodes"].remove(lora)
    ckpt["widgets_values"] = ["mini_sd15.safetensors"]  # as a user's saved graph names it
    graph["links"] = [link for link in graph["links"] if lora["id"] not in (link[3],)]
    for link in graph["links"]:
        if link[1] == lora["id"]:
            link[1] = ckpt["id"]  # lora MODEL (0) / CLIP (1) -> checkpoint MODEL (0) / CLIP (1)
    for slot, output in enumerate(ckpt["outputs"][:2]):
        output["links"] = [link[0] for link in graph["links"] if link[1] == ckpt["id"] and link[2] == slot]
    return graph


def node_of(canvas: Session, type_: str) -> dict[str, Any]:
    return canvas.js("t => { const n = app.graph.nodes.find(n => n.type === t); return {id: n.id} }", type_)


def widget(canvas: Session, node_id: int, name: str) -> Any:
    return canvas.js(
        "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value", [node_id, name]
    )


def set_widget(canvas: Session, node_id: int, name: str, value: Any) -> None:
    canvas.js(
        "([id, name, v]) => { app.graph.getNodeById(id).widgets.find(w => w.name === name).value = v }",
        [node_id, name, value],
    )


def input_source(canvas: Session, node_id: int, input_name: str) -> str | None:
    """The type of the node feeding `input_name`, or None when it is not connected."""
    return canvas.js(
        """([id, name]) => { const n = app.graph.getNodeById(id);
           const slot = n.inputs.findIndex(i => i.name === name);
           const src = n.getInputNode(slot); return src ? src.type : null }""",
        [node_id, input_name],
    )


def screen_pos(canvas: Session, node_id: int, output_slot: int | None) -> tuple[float, float]:
    """Where on the screen an output slot (or, with None, the node's body) is drawn."""
    x, y = canvas.js(
        """([id, slot]) => { const n = app.graph.getNodeById(id);
           const p = slot === null ? [n.pos[0] + n.size[0] / 2, n.pos[1] + n.size[1] / 2]
                                   : n.getConnectionPos(false, slot);
           const c = app.canvas.ds.convertOffsetToCanvas(p);
           const r = app.canvas.canvas.getBoundingClientRect(); return [r.left + c[0], r.top + c[1]] }""",
        [node_id, output_slot],
    )
    return float(x), float(y)


def empty_canvas_spot(canvas: Session) -> tuple[float, float]:
    """A screen point where the canvas itself is hit: no node, no DOM widget, panel or toast above it."""
    x, y = canvas.js(
        """() => { const el = app.canvas.canvas, r = el.getBoundingClientRect();
           for (let y = r.bottom - 60; y > r.top + 60; y -= 40) {
             for (let x = r.left + 60; x < r.right - 60; x += 40) {
               const g = app.canvas.ds.convertCanvasToOffset([x - r.left, y - r.top]);
               const free = document.elementFromPoint(x, y) === el && !app.graph.getNodeOnPos(g[0], g[1]);
               if (free) return [x, y] } }
           throw new Error('no empty spot on the canvas') }"""
    )
    return float(x), float(y)


def toast_with(text: str) -> str:
    """A toast that shows `text` (PrimeVue's in 1.27, the card with a close button in 1.58)."""
    return (
        f".p-toast-message:has-text('{text}'), .shadow-lg:has([data-testid='toast-close']):has-text('{text}')"
    )


def move_below(canvas: Session, node_id: int, anchor_id: int) -> None:
    """Put a node under another one and wait until it stays there.

    The newer search box places the node it added once more after the dialog closes, so a move made
    right away can be undone: repeat it until the node is found where it was put.
    """
    move = """([id, a]) => { const n = app.graph.getNodeById(id), k = app.graph.getNodeById(a);
        const x = k.pos[0], y = k.pos[1] + k.size[1] + 60, there = n.pos[0] === x && n.pos[1] === y;
        if (!there) { n.pos = [x, y]; app.graph.setDirtyCanvas(true, true) } return there }"""
    stayed = 0
    for _ in range(20):
        stayed = stayed + 1 if canvas.js(move, [node_id, anchor_id]) else 0
        if stayed == 2:
            return
        canvas.page.wait_for_timeout(300)
    raise AssertionError(f"node {node_id} did not stay where it was moved")


def drag(canvas: Session, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Drag with the mouse as a person does: hover, press, move a little, then on to the target.

    A click on empty canvas first ends the pointer gesture the search box's double click left open;
    without it the newer canvas moves the selected node instead of pulling a wire from the slot.
    """
    mouse = canvas.page.mouse
    mouse.click(*empty_canvas_spot(canvas))
    mouse.move(start[0] - 20, start[1])
    mouse.move(*start, steps=3)
    canvas.page.wait_for_timeout(200)
    mouse.down()
    canvas.page.wait_for_timeout(200)
    mouse.move(start[0] + 10, start[1] + 5, steps=3)
    mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=5)
    mouse.move(*end, steps=5)
    mouse.up()


def highlighted_search_result(title: str) -> str:
    """The search result Enter would add, when it is the node titled `title` (either search box)."""
    return (
        f".p-autocomplete-option.p-focus:has-text('{title}'), "
        f"[data-testid='result-item'][aria-selected='true']:has-text('{title}')"
    )


def open_node_search(canvas: Session) -> None:
    """Double-click empty canvas until the node search box shows.

    litegraph counts two clicks as a double click only within 300 ms of its own clock; on a loaded
    2-core machine the page sometimes sees them further apart, so a few tries are allowed.
    """
    search = NODE_SEARCH_INPUT
    for _ in range(4):
        canvas.page.mouse.dblclick(*empty_canvas_spot(canvas))
        try:
            canvas.page.wait_for_selector(search, state="visible", timeout=5_000)
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError("double-clicking the empty canvas never opened the node search box")


def test_page_loads_our_default_graph_on_the_installed_models(canvas: Session) -> None:
    canvas.fit_view()
    canvas.shot("01-default-graph")
    types = canvas.js("() => app.graph.nodes.map(n => n.type)")
    assert {"CheckpointLoaderSimple", "LoraLoader", "KSampler", "SaveImage"} <= set(types)
    ksampler, lora, ckpt = (
        node_of(canvas, t)["id"] for t in ("KSampler", "LoraLoader", "CheckpointLoaderSimple")
    )
    assert input_source(canvas, ksampler, "model") == "LoraLoader"
    # The names in the shipped graph do not exist here; the frontend switched them to the first real file.
    assert widget(canvas, ckpt, "ckpt_name") == "mini_sd15.safetensors"
    assert widget(canvas, lora, "lora_name") == "mini_lora_a.safetensors"
    assert [e for e in canvas.page_errors if not e.startswith(KNOWN_PAGE_ERRORS)] == []
    assert canvas.outside_requests == []


def test_lora_panel_shows_facts_and_a_trigger_word_click_edits_the_positive_prompt(canvas: Session) -> None:
    page = canvas.page
    page.wait_for_function("() => document.querySelectorAll('.nodegraph-word').length === 2", timeout=15_000)
    assert page.locator(".nodegraph-word").all_inner_texts() == ["cattail style", "red chair"]
    assert "SD1.5" in page.inner_text(".nodegraph-facts") and "rank 4" in page.inner_text(".nodegraph-facts")
    page.wait_for_function("() => document.querySelector('.nodegraph-preview').naturalWidth === 32")
    positive, negative = canvas.js(
        """() => app.graph.nodes.filter(n => n.type === 'CLIPTextEncode')
                 .sort((a, b) => a.title.includes('Negative') - b.title.includes('Negative'))
                 .map(n => n.id)"""
    )
    before_neg = widget(canvas, negative, "text")
    page.click(".nodegraph-word >> text=cattail style")
    assert widget(canvas, positive, "text").endswith(", cattail style")
    page.click(".nodegraph-word >> text=cattail style")  # a second click does not repeat it
    assert widget(canvas, positive, "text").count("cattail style") == 1
    assert widget(canvas, negative, "text") == before_neg
    canvas.shot("02-lora-panel")


def test_lora_picker_searches_and_sets_the_loader(canvas: Session) -> None:
    page = canvas.page
    lora = node_of(canvas, "LoraLoader")["id"]
    page.click(".nodegraph-pick")
    page.wait_for_selector(".nodegraph-picker-item")
    assert page.locator(".nodegraph-picker-item").count() == 3
    # the loader is wired to the SD1.5 checkpoint: every SD1.5 LoRA is marked as fitting it
    assert page.locator(".nodegraph-picker-item[data-fits='true']").count() == 3
    page.fill(".nodegraph-picker input", "cattail")  # a trigger word finds its LoRA
    assert page.locator(".nodegraph-picker-item").all_inner_texts()[0].startswith("mini_lora_a")
    assert page.locator(".nodegraph-picker-item").count() == 1
    page.fill(".nodegraph-picker input", "lora_b")
    assert page.locator(".nodegraph-picker-item").count() == 1
    page.keyboard.press("Enter")
    assert widget(canvas, lora, "lora_name") == "mini_lora_b.safetensors"
    page.wait_for_function("() => document.querySelector('.nodegraph-facts').textContent.includes('rank 8')")
    assert page.locator(".nodegraph-picker").count() == 0


def test_lora_added_from_search_box_and_wired_in(canvas: Session) -> None:
    page = canvas.page
    canvas.js("g => app.loadGraphData(g)", graph_without_lora())
    page.wait_for_function("() => !app.graph.nodes.some(n => n.type === 'LoraLoader')")
    canvas.fit_view()
    open_node_search(canvas)
    page.keyboard.type("LoraLoader")
    # Enter adds the highlighted result; wait until the results for what was typed are there.
    page.wait_for_selector(highlighted_search_result("Load LoRA"))
    page.keyboard.press("Enter")
    page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'LoraLoader')")
    ckpt, lora = (node_of(canvas, t)["id"] for t in ("CheckpointLoaderSimple", "LoraLoader"))
    # Move it under the checkpoint, then drag the MODEL wire with the mouse and drop it on the node body.
    move_below(canvas, lora, ckpt)
    drag(canvas, screen_pos(canvas, ckpt, 0), screen_pos(canvas, lora, None))
    assert input_source(canvas, lora, "model") == "CheckpointLoaderSimple"
    # The other wires through the graph API, as an extension would.
    canvas.js(
        """([c, l]) => { const ck = app.graph.getNodeById(c), lo = app.graph.getNodeById(l);
           ck.connect(1, lo, 1);
           const ks = app.graph.nodes.find(n => n.type === 'KSampler'); lo.connect(0, ks, 0);
           for (const te of app.graph.nodes.filter(n => n.type === 'CLIPTextEncode')) {
             lo.connect(1, te, 0) } }""",
        [ckpt, lora],
    )
    ksampler = node_of(canvas, "KSampler")["id"]
    assert input_source(canvas, ksampler, "model") == "LoraLoader"
    assert input_source(canvas, lora, "clip") == "CheckpointLoaderSimple"
    encoders = canvas.js("() => app.graph.nodes.filter(n => n.type === 'CLIPTextEncode').map(n => n.id)")
    assert all(input_source(canvas, te, "clip") == "LoraLoader" for te in encoders)
    assert widget(canvas, lora, "lora_name") == "mini_lora_a.safetensors"


def test_queued_prompt_shows_progress_and_the_output_image(canvas: Session) -> None:
    page = canvas.page
    latent, ksampler = node_of(canvas, "EmptyLatentImage")["id"], node_of(canvas, "KSampler")["id"]
    set_widget(canvas, latent, "width", 64)
    set_widget(canvas, latent, "height", 64)
    set_widget(canvas, ksampler, "steps", 2)
    canvas.js("() => { window.__progress = []; window.comfyAPI.api.api.addEventListener('progress',"
              " e => window.__progress.push(e.detail)) }")  # fmt: skip
    canvas.fit_view()
    page.click("[data-testid='queue-button'] button, button[data-testid='queue-button']")
    # A first run loads the model: on a busy 2-core machine that took 113 s (1.58.1, load 15).
    page.wait_for_function(IMAGE_SHOWN, timeout=300_000)
    page.wait_for_timeout(300)
    canvas.shot("03-output-image")
    progress = canvas.js("() => window.__progress")
    assert progress and progress[-1]["max"] == 2 and progress[-1]["value"] == 2
    assert progress[-1]["node"] == str(ksampler)
    sent = canvas.prompts[-1]["prompt"]
    lora_id = str(node_of(canvas, "LoraLoader")["id"])
    assert sent[str(ksampler)]["inputs"]["model"] == [lora_id, 0]
    assert sent[lora_id]["inputs"]["lora_name"] == "mini_lora_a.safetensors"
    assert "workflow" in canvas.prompts[-1]["extra_data"]["extra_pnginfo"]


def test_queue_panel_lists_the_finished_prompt_with_its_image(canvas: Session) -> None:
    page = canvas.page
    page.click(QUEUE_PANEL_BUTTON)
    page.wait_for_function(
        """s => [...document.querySelectorAll(s)].some(i => i.complete && i.naturalWidth === 64)""",
        arg=QUEUE_PANEL_IMAGE,
    )
    assert page.locator(QUEUE_PANEL_IMAGE).count() >= 1
    page.click(QUEUE_PANEL_BUTTON)  # close the panel again


def test_coverage_warning_shows_on_the_node_and_as_a_toast(canvas: Session) -> None:
    page = canvas.page
    lora = node_of(canvas, "LoraLoader")["id"]
    set_widget(canvas, lora, "lora_name", "partial_lora.safetensors")  # one module matches no layer
    canvas.js("() => { window.__images = 0; window.comfyAPI.api.api.addEventListener('executed',"
              " e => { if (e.detail.output?.images) window.__images += 1 }) }")  # fmt: skip
    page.click("[data-testid='queue-button'] button, button[data-testid='queue-button']")
    # The engine's warning travels as the server's "nodegraph.warning" websocket message.
    page.wait_for_selector(".nodegraph-warning:has-text('no_such_block')", timeout=300_000)
    page.wait_for_selector(toast_with("no_such_block"))
    page.wait_for_function("() => window.__images === 1", timeout=300_000)  # it still ran
    canvas.shot("04-coverage-warning")
    # The next run starts clean.
    canvas.js("() => window.comfyAPI.api.api.dispatchCustomEvent('execution_start', {prompt_id: 'q'})")
    page.wait_for_selector(".nodegraph-warning", state="hidden")
    set_widget(canvas, lora, "lora_name", "mini_lora_a.safetensors")


def test_workflow_saves_to_the_server_and_reopens(canvas: Session) -> None:
    page = canvas.page
    canvas.js("() => { app.extensionManager.command.execute('Comfy.SaveWorkflow') }")
    page.wait_for_selector(DIALOG_INPUT)
    page.fill(DIALOG_INPUT, "e2e_lora")
    page.keyboard.press("Enter")
    page.wait_for_selector(DIALOG, state="detached")
    with urllib.request.urlopen(canvas.url + "/api/userdata/workflows%2Fe2e_lora.json") as reply:
        saved = json.load(reply)
    assert "LoraLoader" in [n["type"] for n in saved["nodes"]]
    warn = "() => window.comfyAPI.api.api.dispatchCustomEvent('nodegraph.warning', {node: '1', message: 'm'})"
    canvas.js(warn)
    assert canvas.js("() => window.nodegraph.warnings.size") == 1
    canvas.js("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_function("() => app.graph.nodes.length === 0")
    assert canvas.js("() => window.nodegraph.warnings.size") == 0  # warnings belong to the graph that ran
    page.click(".workflows-tab-button, button[aria-label*='Workflows']")
    page.click(".p-tree :text('e2e_lora'), .node-label :text('e2e_lora')")
    page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'LoraLoader')")
    assert canvas.js("() => app.graph.nodes.length") == len(saved["nodes"])
    page.click(".workflows-tab-button, button[aria-label*='Workflows']")  # close the sidebar again


def _drop_png(canvas: Session, data: bytes, name: str) -> None:
    """Drop a PNG file on the canvas the way a file manager does (a DataTransfer on a drop event)."""
    canvas.js(
        """([b64, name]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
           const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'image/png'}));
           const drop = new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true});
           app.canvas.canvas.dispatchEvent(drop) }""",
        [base64.b64encode(data).decode(), name],
    )


def test_dropped_pngs_from_nodegraph_and_comfyui_load_their_workflows(canvas: Session) -> None:
    page = canvas.page
    image = canvas.js("() => app.graph.nodes.find(n => n.type === 'SaveImage').images?.[0] ?? null")
    if image is None:  # the reopened workflow has no outputs; use the last run's history entry
        image = canvas.js("() => Object.values(app.nodeOutputs).flatMap(o => o.images ?? [])[0] ?? null")
    assert image is not None, "no output image known to the page"
    query = f"filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
    with urllib.request.urlopen(f"{canvas.url}/api/view?{query}") as reply:
        ours = reply.read()
    canvas.js("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
    page.wait_for_function("() => app.graph.nodes.length === 0")
    _drop_png(canvas, ours, "nodegraph_output.png")
    page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'LoraLoader')")

    comfy_graph = graph_without_lora()
    next(n for n in comfy_graph["nodes"] if n["type"] == "SaveImage")["title"] = "Saved by ComfyUI"
    info = PngInfo()
    info.add_text("prompt", json.dumps({"9": {"class_type": "SaveImage", "inputs": {}}}))
    info.add_text("workflow", json.dumps(comfy_graph))
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buffer, format="PNG", pnginfo=info)
    _drop_png(canvas, buffer.getvalue(), "ComfyUI_00001_.png")
    page.wait_for_function("() => app.graph.nodes.some(n => n.title === 'Saved by ComfyUI')")
    assert not canvas.js("() => app.graph.nodes.some(n => n.type === 'LoraLoader')")


def test_model_lists_refresh_when_files_are_added(canvas: Session) -> None:
    loras = canvas.base / "models" / "loras"
    shutil.copy(loras / "mini_lora_b.safetensors", loras / "added_later.safetensors")
    canvas.js("() => app.extensionManager.command.execute('Comfy.LoadDefaultWorkflow')")
    canvas.page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'LoraLoader')")
    canvas.js("() => app.extensionManager.command.execute('Comfy.RefreshNodeDefinitions')")
    canvas.page.wait_for_function(
        """() => app.graph.nodes.find(n => n.type === 'LoraLoader').widgets
                 .find(w => w.name === 'lora_name').options.values.includes('added_later.safetensors')""",
        timeout=15_000,
    )


def test_session_had_no_unexpected_page_errors_or_outside_requests(canvas: Session) -> None:
    assert [e for e in canvas.page_errors if not e.startswith(KNOWN_PAGE_ERRORS)] == []
    assert canvas.outside_requests == []
