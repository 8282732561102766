"""Comfy API v2 submit's `Idempotency-Key`, with the Stripe semantics the v2 contract states
(openapi `postJobs`): the same key and body replay the first answer (201, the same job,
`Idempotency-Replayed: true`) and queue nothing; the same key with another body is 422
`idempotency_key_reuse`; a resend while the first is in flight is 409 `idempotency_conflict` with
`Retry-After`; a refused submit records nothing. Keys outlive a restart, expire after a day and are
bounded in number. In-process over the stub nodes, plus the key store on its own.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from nodegraph.server import create_app
from nodegraph.server.routes_v2 import v2_error
from nodegraph.server.v2_idempotency import IdempotencyKeys, answer_resend, request_hash
from tests.server.live import LiveServer
from tests.server.stubs import make_engine, txt2img


async def finished(client: TestClient, job_id: str) -> dict[str, Any]:
    for _ in range(1500):
        job: dict[str, Any] = await (await client.get(f"/api/v2/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.asyncio
async def test_a_resend_with_the_same_body_gets_the_first_answer(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path)))
    key = {"Idempotency-Key": "retry-1"}
    body = {"workflow": txt2img(seed=5), "metadata": {"run": "a"}}
    first = await client.post("/api/v2/jobs", json=body, headers=key)
    answer = await first.json()
    assert first.status == 201 and "Idempotency-Replayed" not in first.headers
    # the same request again, its keys in another order and spaced otherwise: the same body
    resent = json.dumps(
        {"metadata": {"run": "a"}, "workflow": dict(reversed(txt2img(seed=5).items()))}, indent=1
    )
    again = await client.post(
        "/api/v2/jobs", data=resent, headers={**key, "Content-Type": "application/json"}
    )
    assert again.status == 201 and again.headers["Idempotency-Replayed"] == "true"
    assert await again.json() == answer  # the recorded answer, byte for byte the same job
    await finished(client, answer["id"])
    later = await client.post("/api/v2/jobs", json=body, headers=key)  # after it ran: still that answer
    assert later.status == 201 and await later.json() == answer
    listed = (await (await client.get("/api/v2/jobs")).json())["jobs"]
    assert [job["id"] for job in listed] == [answer["id"]]  # queued once


@pytest.mark.asyncio
async def test_the_same_key_with_another_body_is_refused(aiohttp_client: Any, tmp_path: Path) -> None:
    client: TestClient = await aiohttp_client(create_app(make_engine(tmp_path)))
    key = {"Idempotency-Key": "retry-2"}
    job = await (await client.post("/api/v2/jobs", json={"workflow": txt2img(seed=1)}, headers=key)).json()
    other = await client.post("/api/v2/jobs", json={"workflow": txt2img(seed=2)}, headers=key)
    error = (await other.json())["error"]
    assert other.status == 422 and error["code"] == "idempotency_key_reuse"
    assert error["details"]["job_id"] == job["id"] and job["id"] in error["message"]
    # a refused submit records nothing: its key stays free for the corrected request
    free = {"Idempotency-Key": "retry-3"}
    bad = await client.post(
        "/api/v2/jobs", json={"workflow": {"1": {"class_type": "Nope", "inputs": {}}}}, headers=free
    )
    assert bad.status == 422 and (await bad.json())["error"]["code"] == "invalid_workflow"
    good = await client.post("/api/v2/jobs", json={"workflow": txt2img(seed=3)}, headers=free)
    assert good.status == 201 and "Idempotency-Replayed" not in good.headers
    await finished(client, (await good.json())["id"])


def _submit(server: LiveServer, key: str, workflow: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    request = urllib.request.Request(
        f"http://{server.address}/api/v2/jobs",
        data=json.dumps({"workflow": workflow}).encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def test_a_key_outlives_a_restart(tmp_path: Path) -> None:
    """The keys are kept beside the queue: a resend after a restart replays the job queued before it
    (it cannot be queued twice), another body is still refused, a refused submit freed its key."""
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    with LiveServer(make_engine(tmp_path)) as first:
        status, job, _ = _submit(first, "restart-key", txt2img())
        assert status == 201
        assert _submit(first, "freed-key", bad)[0] == 422  # nothing queued: the key stays usable
    with LiveServer(make_engine(tmp_path)) as second:
        status, again, headers = _submit(second, "restart-key", txt2img())
        assert status == 201 and again == job and headers["Idempotency-Replayed"] == "true"
        status, refused, _ = _submit(second, "restart-key", txt2img(seed=9))
        assert status == 422 and refused["error"]["code"] == "idempotency_key_reuse"
        assert _submit(second, "freed-key", txt2img())[0] == 201


def keys_in(tmp_path: Path, **limits: Any) -> IdempotencyKeys:
    db = sqlite3.connect(str(tmp_path / "keys.sqlite"), check_same_thread=False, isolation_level=None)
    return IdempotencyKeys(db, threading.Lock(), **limits)


def test_a_resend_while_the_first_is_in_flight_is_a_conflict(tmp_path: Path) -> None:
    keys = keys_in(tmp_path)
    body = request_hash({"workflow": txt2img()})
    assert keys.claim("k", body, "job-1") is None  # the first request holds it while it validates
    claim = keys.claim("k", body, "job-2")
    assert claim is not None and claim.job_id == "job-1" and claim.status is None
    conflict = answer_resend(keys, claim, body, "job-2", lambda _: None, v2_error)
    assert conflict is not None and conflict.status == 409 and conflict.headers["Retry-After"] == "1"
    assert json.loads(conflict.text or "")["error"]["code"] == "idempotency_conflict"
    keys.record("k", 201, '{"id": "job-1"}')
    claim = keys.claim("k", body, "job-3")
    assert claim is not None
    replayed = answer_resend(keys, claim, body, "job-3", lambda _: None, v2_error)
    assert replayed is not None and replayed.status == 201 and replayed.text == '{"id": "job-1"}'


def test_an_abandoned_claim_is_settled_on_its_next_use(tmp_path: Path) -> None:
    """A claim whose process died before it answered: replayed from its job when that job was queued,
    else this request takes the key over."""
    body = request_hash({"workflow": txt2img()})
    dead = keys_in(tmp_path)
    assert dead.claim("queued", body, "job-1") is None and dead.claim("lost", body, "job-2") is None
    keys = keys_in(tmp_path)  # the next process
    known = {"job-1": {"id": "job-1", "status": "running"}}
    claim = keys.claim("queued", body, "job-3")
    assert claim is not None
    replayed = answer_resend(keys, claim, body, "job-3", known.get, v2_error)
    assert (
        replayed is not None and replayed.status == 201 and json.loads(replayed.text or "")["id"] == "job-1"
    )
    claim = keys.claim("lost", body, "job-4")
    assert claim is not None
    assert answer_resend(keys, claim, body, "job-4", known.get, v2_error) is None  # taken over
    assert keys.in_flight("lost")


def test_keys_expire_and_are_bounded(tmp_path: Path) -> None:
    body = request_hash({})
    keys = keys_in(tmp_path, max_keys=2)
    for n in range(3):
        assert keys.claim(f"k{n}", body, f"job-{n}") is None
    assert keys.claim("k0", body, "again") is None  # the oldest was dropped: at most 2 kept
    assert keys.claim("k2", body, "again") is not None
    aged = keys_in(tmp_path, ttl_s=0.0)
    assert aged.claim("k2", body, "again") is None  # older than the time to live: free again


def test_the_single_use_keys_of_an_older_version_are_kept(tmp_path: Path) -> None:
    """A file written when keys were single-use (no body kept): the key still stands for its job."""
    db = sqlite3.connect(str(tmp_path / "keys.sqlite"), isolation_level=None)
    db.execute(
        "CREATE TABLE idempotency_keys (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "key TEXT UNIQUE NOT NULL, job_id TEXT, created_at TEXT)"
    )
    db.execute(
        "INSERT INTO idempotency_keys (key, job_id, created_at) VALUES ('old', 'job-1', datetime('now'))"
    )
    db.close()
    keys = keys_in(tmp_path)
    body = request_hash({"workflow": {}})
    claim = keys.claim("old", body, "job-2")
    assert claim is not None and claim.job_id == "job-1" and claim.request_hash is None
    found = {"job-1": {"id": "job-1"}}
    replayed = answer_resend(keys, claim, body, "job-2", found.get, v2_error)
    assert replayed is not None and json.loads(replayed.text or "") == {"id": "job-1"}


def test_the_fingerprint_ignores_key_order_and_takes_any_json() -> None:
    assert request_hash({"a": 1, "b": [1, 2.5]}) == request_hash({"b": [1, 2.5], "a": 1})
    assert request_hash({"a": 1}) != request_hash({"a": 1.5})
    assert request_hash({"text": "\ud800"})  # a lone surrogate, as json.loads gives for "\\ud800"
