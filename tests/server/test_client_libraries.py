"""Third-party client libraries from PyPI, used unchanged against a real server on a loopback port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

from tests.server.live import LiveServer
from tests.server.stubs import make_engine, txt2img

PNG = b"\x89PNG\r\n\x1a\n"


def titled(prompt: dict[str, Any]) -> dict[str, Any]:
    """The prompt with `_meta.title`s, as the canvas's "Export (API)" writes them."""
    titles = {"1": "Seed", "2": "Sampler", "3": "Save Image"}
    return {nid: {**node, "_meta": {"title": titles[nid]}} for nid, node in prompt.items()}


def test_comfy_api_simplified_gets_the_png_not_a_preview(tmp_path: Path) -> None:
    """It reads every binary frame as an output image: a server that sends previews to a client that
    never asked makes it return JPEG previews instead of the PNG. The sampler steps take long enough
    for its socket (opened after queueing) to be there when the first preview is made."""
    with LiveServer(make_engine(tmp_path)) as server:
        api = ComfyApiWrapper(f"http://{server.address}")
        workflow = ComfyWorkflowWrapper(titled(txt2img(seed=5, steps=3, delay=0.2)))
        workflow.set_node_param("Sampler", "seed", 11)
        images = api.queue_and_wait_images(workflow, "Save Image")
    assert list(images) == ["stub_7_11_.png"]
    data = images["stub_7_11_.png"]
    assert data.startswith(PNG)
    assert data == (tmp_path / "output" / "stub_7_11_.png").read_bytes()
