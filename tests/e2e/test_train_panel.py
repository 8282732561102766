"""The canvas's Train LoRA panel end to end: headless Chromium, the real server, the mini SD1.5.

One page, in order: the panel lists the dataset folder with kohya's counts and shows the kohya_ss
GUI defaults (the resolution by the checkpoint's family); the guide's example run queued from it
(`img/6_lisabp woman/` with captions and `reg/1_woman/`, kohya's x2 steps; 2 epochs of 2 steps at
64x64 and batch 12, a save and a sample every epoch) shows progress, the loss plot and sample
images while it runs, and its LoRA is in the LoRA lists when it ends; a second run is cancelled
from the panel and keeps no final file.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import KNOWN_PAGE_ERRORS, Session

START = ".nodegraph-train-start"
DATASET_TEXT = "document.querySelector('.nodegraph-train-dataset')"
STATUS_TEXT = "document.querySelector('.nodegraph-train-status').textContent"


@pytest.fixture(scope="module")
def canvas_base(canvas_base: Path) -> Path:
    """The shared canvas base plus the guide's dataset: input/lisa/img/6_lisabp woman/ (2 captioned
    images) and input/lisa/reg/1_woman/ (1 image)."""
    folder = canvas_base / "input" / "lisa" / "img" / "6_lisabp woman"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"lisabp woman, photo {i}\n", encoding="utf-8")
    reg = canvas_base / "input" / "lisa" / "reg" / "1_woman"
    reg.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(reg / "r0.png")
    return canvas_base


def set_field(canvas: Session, name: str, value: Any) -> None:
    canvas.js(
        """([name, value]) => { const i = document.querySelector(`.nodegraph-train [name="${name}"]`);
           if (i.type === 'checkbox') i.checked = value; else i.value = String(value);
           i.dispatchEvent(new Event('change')) }""",
        [name, value],
    )


def field(canvas: Session, name: str) -> Any:
    return canvas.js(
        """name => { const i = document.querySelector(`.nodegraph-train [name="${name}"]`);
           return i.type === 'checkbox' ? i.checked : i.value }""",
        name,
    )


def history(canvas: Session, prompt_id: str) -> dict[str, Any]:
    """The prompt's finished history entry (the websocket's last message can come before it is written)."""
    for _ in range(300):
        with urllib.request.urlopen(f"{canvas.url}/api/history/{prompt_id}", timeout=30) as reply:
            entry: dict[str, Any] | None = json.loads(reply.read()).get(prompt_id)
        if entry is not None:  # ComfyUI's rule: in the history once finished, `{}` before
            return entry
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} never reached the history")


def test_panel_lists_the_dataset_with_kohya_gui_defaults(canvas: Session) -> None:
    page = canvas.page
    canvas.js("() => app.extensionManager.command.execute('Workspace.ToggleSidebarTab.nodegraph-train')")
    page.wait_for_selector(START, state="visible", timeout=30_000)
    page.wait_for_function(f"() => {DATASET_TEXT}.textContent.includes('×')")
    assert field(canvas, "dataset") == "lisa/img"
    assert "6_lisabp woman: 2 images × 6" in page.inner_text(".nodegraph-train-dataset")
    assert "12 images per epoch" in page.inner_text(".nodegraph-train-dataset")
    defaults = {n: field(canvas, n) for n in ("network_dim", "network_alpha", "lr_scheduler", "resolution")}
    assert defaults == {
        "network_dim": "8", "network_alpha": "1", "lr_scheduler": "cosine", "resolution": "512,512"
    }  # fmt: skip
    assert float(field(canvas, "learning_rate")) == 1e-4 and field(canvas, "train_batch_size") == "1"
    canvas.shot("train-01-panel")


def test_a_run_shows_progress_plot_and_samples_live_and_its_lora_is_listed(canvas: Session) -> None:
    page = canvas.page
    for name, value in {
        "ckpt_name": "mini_sd15.safetensors", "output_name": "panel_lora", "epochs": 2, "resolution": "64,64",
        "reg_dataset": "lisa/reg", "train_batch_size": 12, "network_dim": 2, "learning_rate": 1e-3,
        "train_unet_only": True, "seed": 3, "sample_every_n_epochs": 1,
        "sample_prompts": "lisabp woman --n blurry --w 64 --h 64 --d 5 --l 7.5 --s 1",
    }.items():  # fmt: skip
        set_field(canvas, name, value)
    page.click(START)
    page.wait_for_function(
        f"() => /finished|failed|cancelled/.test({STATUS_TEXT})",
        timeout=600_000,
    )
    assert page.inner_text(".nodegraph-train-status") == "finished: 4 steps"
    assert canvas.js("() => [document.querySelector('.nodegraph-train-bar').value, "
                     "document.querySelector('.nodegraph-train-bar').max]") == [4, 4]  # fmt: skip
    log = canvas.js("() => window.nodegraph.train.state.log")
    # live: the plot (drawn at the end of epoch 1) and the epoch-1 samples came before the last step
    assert any(e["plot"] and e["step"] == 2 and not e["done"] for e in log), log
    assert any(e["samples"] == 1 and e["step"] == 2 and not e["done"] for e in log), log
    assert [e["step"] for e in log if not e["done"]][-1] == 4
    page.wait_for_function(
        "() => [...document.querySelectorAll('.nodegraph-train-plot, .nodegraph-train-samples img')]"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator(".nodegraph-train-samples img").count() == 1
    saved = page.inner_text(".nodegraph-train-saved")
    assert "panel_lora-000001.safetensors, panel_lora.safetensors" in saved
    # in the LoRA lists without a restart: the loader's combo and the picker
    page.wait_for_function(
        """() => app.graph.nodes.find(n => n.type === 'LoraLoader').widgets
                 .find(w => w.name === 'lora_name').options.values.includes('panel_lora.safetensors')""",
        timeout=30_000,
    )
    names = canvas.js("async () => (await window.nodegraph.listLoras()).map(i => i.name)")
    assert {"panel_lora.safetensors", "panel_lora-000001.safetensors"} <= set(names)
    prompt_id = canvas.js("() => window.nodegraph.train.state.promptId")
    assert history(canvas, prompt_id)["status"]["status_str"] == "success"
    canvas.shot("train-02-finished")
    assert [e for e in canvas.page_errors if not e.startswith(KNOWN_PAGE_ERRORS)] == []


def test_cancel_interrupts_the_run_and_keeps_no_final_file(canvas: Session) -> None:
    page = canvas.page
    set_field(canvas, "output_name", "panel_cut")
    set_field(canvas, "epochs", 500)
    set_field(canvas, "train_batch_size", 1)
    set_field(canvas, "sample_prompts", "")
    page.click(START)
    page.wait_for_function("() => document.querySelector('.nodegraph-train-bar').value >= 1", timeout=300_000)
    page.click(".nodegraph-train-cancel")
    page.wait_for_function(
        f"() => {STATUS_TEXT}.startsWith('cancelled')",
        timeout=120_000,
    )
    prompt_id = canvas.js("() => window.nodegraph.train.state.promptId")
    kinds = [kind for kind, _ in history(canvas, prompt_id)["status"]["messages"]]
    assert "execution_interrupted" in kinds
    assert not (canvas.base / "models" / "loras" / "panel_cut.safetensors").exists()
    assert canvas.js("() => document.querySelector('.nodegraph-train-start').disabled") is False
    assert [e for e in canvas.page_errors if not e.startswith(KNOWN_PAGE_ERRORS)] == []
