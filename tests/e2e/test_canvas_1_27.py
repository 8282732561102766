"""The smaller browser pass on the older supported canvas, ComfyUI frontend 1.27.10 (the previous pin),
served with `--front-end-root`: the default graph draws on the installed models, our LoRA panel works,
the prompt runs with progress and shows its image, the queue panel lists it, and the session had no
page errors and no requests to outside hosts. The same test functions as `test_canvas.py`, run here
against the old build (this module's `canvas_server` replaces the conftest's).

The 1.27.10 wheel is fetched from PyPI once with pip into `tests/.cache/`; a machine that has neither
the copy nor PyPI skips this module, saying so.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import test_canvas as full
from tests.e2e.conftest import ROOT, serving

OLD = "1.27.10"
# Collected here too, on the old build, in this order (the session's: the run before its queue entry).
test_page_loads_our_default_graph_on_the_installed_models = (
    full.test_page_loads_our_default_graph_on_the_installed_models
)
test_lora_panel_shows_facts_and_a_trigger_word_click_edits_the_positive_prompt = (
    full.test_lora_panel_shows_facts_and_a_trigger_word_click_edits_the_positive_prompt
)
test_queued_prompt_shows_progress_and_the_output_image = (
    full.test_queued_prompt_shows_progress_and_the_output_image
)
test_queue_panel_lists_the_finished_prompt_with_its_image = (
    full.test_queue_panel_lists_the_finished_prompt_with_its_image
)
test_session_had_no_unexpected_page_errors_or_outside_requests = (
    full.test_session_had_no_unexpected_page_errors_or_outside_requests
)
CACHE = ROOT / "tests" / ".cache" / f"comfyui-frontend-{OLD}"


def old_frontend() -> Path:
    """The 1.27.10 build's folder (its `index.html`), unpacked from the wheel once."""
    static = CACHE / "comfyui_frontend_package" / "static"
    if (static / "index.html").is_file():
        return static
    wheels = CACHE.with_name("wheels")
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
               f"comfyui-frontend-package=={OLD}"]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"comfyui-frontend-package {OLD} is not in {CACHE} and pip could not fetch it: {exc}")
    [wheel] = wheels.glob(f"comfyui_frontend_package-{OLD}-*.whl")
    partial = CACHE.with_name(CACHE.name + ".partial")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(partial)
    partial.replace(CACHE)
    return static


@pytest.fixture(scope="module")
def canvas_server(canvas_base: Path) -> Iterator[str]:
    with serving(canvas_base, "--front-end-root", str(old_frontend())) as url:
        yield url
