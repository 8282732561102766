"""Comfy API v2 (`/api/v2`) on nodegraph's own queue, driven by Comfy's SDK (`comfy-sdk`, PyPI) unchanged.

The SDK uploads an image (hashing it with blake3 first and skipping bytes the server has), puts a
`core/ASSET` reference into the workflow, submits with an Idempotency-Key, waits by polling or
over SSE and downloads the output: LoadImage -> ImageInvert -> SaveImage on the real nodes.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfy_sdk import Comfy, StatusChange
from comfy_sdk.exceptions import IdempotencyKeyReuse, InvalidWorkflow, MissingAsset
from PIL import Image

import nodes
from nodegraph.engine import Settings, build_engine
from tests.server.live import LiveServer, http_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    base = tmp_path_factory.mktemp("v2")
    engine = build_engine(
        Settings(base_directory=base, port=0),
        nodes.all_nodes(),
        services=nodes.register_services,
        warm_up=nodes.warm_up,
    )
    engine.warm_up()
    with LiveServer(engine) as live:
        yield live


@pytest.fixture()
def client(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Comfy]:
    monkeypatch.setenv("COMFY_BASE_URL", f"http://{server.address}")
    monkeypatch.delenv("COMFY_API_KEY", raising=False)
    with Comfy(timeout=60) as comfy:
        yield comfy


def invert_workflow(image: Any) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "v2"}},
    }


def picture(path: Path, color: tuple[int, int, int]) -> Path:
    Image.new("RGB", (16, 8), color).save(path)
    return path


def test_upload_submit_wait_download_with_the_sdk(client: Comfy, server: LiveServer, tmp_path: Path) -> None:
    source = picture(tmp_path / "red.png", (200, 30, 10))
    asset = client.assets.from_file(str(source))
    workflow = client.workflows.from_json(invert_workflow(asset))
    job = client.run(workflow, timeout=120)
    assert job.status == "succeeded"
    [output] = job.get_outputs("3")
    data = output.to_bytes()
    got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert got.shape == (8, 16, 3)
    # 255 - the upload; SaveImage truncates 255 * x as ComfyUI does, so 55 may come out as 54
    assert np.abs(got[0, 0].astype(int) - (55, 225, 245)).max() <= 1
    # The upload is a file in the input folder that LoadImage read; its record carries the hash.
    assert (Path(server.engine.env.folders.input_dir) / "red.png").read_bytes() == source.read_bytes()


def test_same_bytes_are_not_uploaded_twice(client: Comfy, tmp_path: Path) -> None:
    first = client.assets.from_file(str(picture(tmp_path / "a.png", (1, 2, 3))))
    first.commit()
    again = client.assets.from_file(str(picture(tmp_path / "b.png", (1, 2, 3))))
    again.commit()  # the SDK asks HEAD by-hash first, then mints from the hash: no second upload
    assert again.id == first.id and again.hash == first.hash and first.hash.startswith("blake3:")
    assert first.created_new is True and again.created_new is False


def test_events_stream_ends_with_the_terminal_status(client: Comfy, tmp_path: Path) -> None:
    asset = client.assets.from_file(str(picture(tmp_path / "g.png", (0, 250, 0))))
    job = client.submit(client.workflows.from_json(invert_workflow(asset)))
    seen = list(job.events())
    assert isinstance(seen[-1], StatusChange) and seen[-1].status == "succeeded"
    assert job.refresh().status == "succeeded"


def test_a_resent_key_replays_its_job_and_another_body_is_refused(client: Comfy, tmp_path: Path) -> None:
    """The SDK, unchanged, against the contract's Stripe semantics: a submit retried with its key
    (its answer lost) gets the same job back; the key with another workflow is `IdempotencyKeyReuse`."""
    asset = client.assets.from_file(str(picture(tmp_path / "k.png", (9, 9, 9))))
    workflow = client.workflows.from_json(invert_workflow(asset))
    job = client.submit(workflow, idempotency_key="nodegraph-test-key-1")
    assert client.submit(workflow, idempotency_key="nodegraph-test-key-1").id == job.id
    other = invert_workflow(asset)
    other["3"]["inputs"]["filename_prefix"] = "v2-other"
    with pytest.raises(IdempotencyKeyReuse) as refused:
        client.submit(client.workflows.from_json(other), idempotency_key="nodegraph-test-key-1")
    assert job.id in str(refused.value)
    assert job.wait(timeout=120).status == "succeeded"


def test_refusals_are_typed_errors(client: Comfy) -> None:
    with pytest.raises(InvalidWorkflow) as bad:
        client.submit(client.workflows.from_json(invert_workflow("no_such_file.png")))
    assert "no_such_file.png" in str(bad.value)
    ref = {"__type": "core/ASSET", "info": {"id": "00000000-0000-4000-8000-000000000000"}}
    with pytest.raises(MissingAsset):
        client.submit(client.workflows.from_json(invert_workflow(ref)))


def _status(server: LiveServer, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://{server.address}{path}", data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            raw = reply.read()
            return reply.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


def test_health_list_cancel_and_unknown_ids(server: LiveServer, client: Comfy, tmp_path: Path) -> None:
    assert http_json(server.address, "/api/v2/health")["status"] == "healthy"
    listed = http_json(server.address, "/api/v2/jobs?limit=2")["jobs"]
    assert 1 <= len(listed) <= 2 and all(j["status"] == "succeeded" for j in listed)
    done = listed[0]["id"]
    status, body = _status(server, "POST", f"/api/v2/jobs/{done}/cancel", b"")
    assert status == 200 and body["status"] == "succeeded"  # a finished job stays as it ended
    status, body = _status(server, "GET", "/api/v2/jobs/3b6f1f5e-0000-4000-8000-000000000000")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = _status(server, "POST", "/api/v2/jobs", b'{"workflow": {"nodes": [], "links": []}}')
    assert status == 422 and body["error"]["code"] == "workflow_format_ui"
    status, body = _status(server, "GET", "/api/v2/jobs?status=done")
    assert status == 400 and body["error"]["code"] == "invalid_request"


def test_the_event_stream_carries_previews(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A running job's latest preview goes out as a `preview` event, which the SDK decodes; no
    websocket client gets the frames (the job's client id is its own)."""
    from comfy_sdk import Preview

    from tests.server.stubs import make_engine, txt2img

    with LiveServer(make_engine(tmp_path)) as server:
        monkeypatch.setenv("COMFY_BASE_URL", f"http://{server.address}")
        monkeypatch.delenv("COMFY_API_KEY", raising=False)
        with Comfy(timeout=60) as comfy:
            job = comfy.submit(comfy.workflows.from_json(txt2img(steps=4, delay=0.3)))
            seen = list(job.events())
    previews = [e for e in seen if isinstance(e, Preview)]
    assert previews and previews[0].node_id == "2" and previews[0].content_type == "image/jpeg"
    assert previews[0].to_pil().size[0] > 0
    assert isinstance(seen[-1], StatusChange) and seen[-1].status == "succeeded"
