"""Comfy API v2's links and event stream, in-process over the stub nodes.

Links: job `urls` are host-relative (the contract's JobUrls allow it and the reference proxy sends
them so); the absolute asset and output URLs name a loopback `Host` or the address the connection
came in on, never a `Host` the client made up. Events: the v2 stream is live push, not a log — no
`id:` fields and no `Last-Event-ID` resume; a reconnecting client gets the current snapshot first.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient
from PIL import Image

from nodegraph.server import create_app
from tests.server.stubs import make_engine, txt2img

pytestmark = pytest.mark.asyncio
TOKEN = {"Authorization": "Bearer s3cret"}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


async def upload(client: TestClient, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    form = FormData()
    form.add_field("file", png(), filename="a.png", content_type="image/png")
    form.add_field("file_path", "a.png")
    form.add_field("content_type", "image/png")
    reply = await client.post("/api/v2/assets", data=form, headers=headers)
    return reply.status, await reply.json()


async def finished(client: TestClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    for _ in range(1500):
        job: dict[str, Any] = await (await client.get(f"/api/v2/jobs/{job_id}", headers=headers)).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


async def test_a_made_up_host_never_reaches_the_links(aiohttp_client: Any, tmp_path: Path) -> None:
    """With a token, any well-formed Host is served; none of it may come back in a link."""
    engine = make_engine(tmp_path, listen="0.0.0.0", auth_token="s3cret")
    client: TestClient = await aiohttp_client(create_app(engine))
    hostile = {**TOKEN, "Host": "evil.example:666"}
    reply = await client.post("/api/v2/jobs", json={"workflow": txt2img(seed=3)}, headers=hostile)
    text = await reply.text()
    assert reply.status == 201 and "evil" not in text
    job_id = json.loads(text)["id"]
    assert json.loads(text)["urls"] == {
        "self": f"/api/v2/jobs/{job_id}",
        "events": f"/api/v2/jobs/{job_id}/events",
        "cancel": f"/api/v2/jobs/{job_id}/cancel",
    }
    origin = f"http://127.0.0.1:{client.port}"  # where the connection came in
    done = await finished(client, job_id, hostile)
    [output] = done["outputs"]
    assert output["url"] == f"{origin}/api/v2/assets/{output['id']}/content"
    listed = await (await client.get("/api/v2/jobs", headers=hostile)).text()
    assert "evil" not in listed and origin in listed
    status, asset = await upload(client, hostile)
    assert status == 201 and asset["url"] == f"{origin}/api/v2/assets/{asset['id']}/content"
    again = await client.get(f"/api/v2/assets/{asset['id']}", headers=hostile)
    assert "evil" not in await again.text()
    content = await client.get(output["url"].removeprefix(origin), headers=TOKEN)
    assert content.status == 200 and (await content.read())[:4] == b"\x89PNG"


async def test_a_loopback_host_is_kept_as_the_client_wrote_it(aiohttp_client: Any, tmp_path: Path) -> None:
    """Without a token only loopback names are served (anything else is a 403 first); `localhost`
    and the port the client used (a forwarded port) stay in the asset URL it gets back."""
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path)))
    status, asset = await upload(client, {"Host": "localhost:8189"})
    assert status == 201 and asset["url"] == f"http://localhost:8189/api/v2/assets/{asset['id']}/content"
    status, _ = await upload(client, {"Host": "evil.example"})
    assert status == 403
    status, asset = await upload(client, {"Host": "[::1]:9"})
    assert asset["url"].startswith("http://[::1]:9/api/v2/assets/")


def frames(raw: str) -> list[dict[str, str]]:
    """The SSE frames as field -> value (comments dropped)."""
    found = []
    for block in raw.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            found.append(fields)
    return found


async def test_the_event_stream_is_live_push_without_ids(aiohttp_client: Any, tmp_path: Path) -> None:
    """The v2 contract: "events carry no `id`, there is no `Last-Event-ID` resume"; a reconnect,
    whatever `Last-Event-ID` it sends, starts from the current snapshot (a `status` first), and each
    stream ends with the terminal `status` after the outputs."""
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path)))
    job = await (await client.post("/api/v2/jobs", json={"workflow": txt2img(steps=6, delay=0.05)})).json()
    first = await (await client.get(job["urls"]["events"])).text()
    seen = frames(first)
    assert all("id" not in f and "retry" not in f for f in seen)
    assert seen[0]["event"] == "status" and seen[-1]["event"] == "status"
    assert json.loads(seen[-1]["data"])["status"] == "succeeded"
    assert [f["event"] for f in seen].count("output") == 1
    again = frames(await (await client.get(job["urls"]["events"], headers={"Last-Event-ID": "3"})).text())
    assert [f["event"] for f in again] == ["output", "status"]  # the finished job's snapshot, no replay
    assert json.loads(again[0]["data"])["id"] == json.loads(seen[-2]["data"])["id"]


async def test_each_output_goes_out_once_its_node_has_finished(aiohttp_client: Any, tmp_path: Path) -> None:
    """The contract: `output` is "emitted the moment each output asset is committed" and a job's
    `outputs` "populates incrementally while the job runs". Two save nodes, each after its own
    sampler: the first one's output is announced, and polled, while the second sampler still runs;
    the outputs come in the order the nodes showed them (ComfyUI's `executed` order)."""
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path)))
    workflow = {
        **txt2img(seed=1, steps=6, delay=0.2, prefix="first"),
        "4": {
            "class_type": "StubSampler",
            "inputs": {"latent": ["1", 0], "seed": 2, "steps": 6, "delay": 0.2},
        },
        "5": {"class_type": "StubSave", "inputs": {"images": ["4", 0], "filename_prefix": "second"}},
    }
    job = await (await client.post("/api/v2/jobs", json={"workflow": workflow})).json()
    stream = await client.get(job["urls"]["events"])
    seen: list[dict[str, str]] = []
    polled: dict[str, Any] | None = None
    block = ""
    while line := (await stream.content.readline()).decode():
        block += line
        if line != "\n":
            continue
        seen += frames(block)
        block = ""
        if seen and seen[-1]["event"] == "output" and polled is None:
            polled = await (await client.get(f"/api/v2/jobs/{job['id']}")).json()
    names = [f["event"] for f in seen]
    first = names.index("output")
    assert "progress" in names[first:]  # the other sampler was still stepping
    assert polled is not None and polled["status"] == "running"
    assert [o["id"] for o in polled["outputs"]] == [json.loads(seen[first]["data"])["id"]]
    # the first save and what feeds it (seed, sampler) are done, the second sampler and save are not
    assert (polled["progress"]["nodes_done"], polled["progress"]["nodes_total"]) == (3, 5)
    done = await finished(client, job["id"], {})
    announced = [json.loads(f["data"]) for f in seen if f["event"] == "output"]
    assert [o["node_id"] for o in announced] == [o["node_id"] for o in done["outputs"]]
    assert sorted(o["node_id"] for o in announced) == ["3", "5"]
    assert [o["id"] for o in announced] == [o["id"] for o in done["outputs"]]
