"""`Idempotency-Key` on Comfy API v2's `POST /api/v2/jobs`, with the Stripe semantics the v2
contract states (openapi `postJobs`, `IdempotencyKey`; comfy-api-proxy `spec/openapi.yaml`):

- a retry with the same key and the same body replays the recorded response: the same status
  (201) and body (the same job), with `Idempotency-Replayed: true`; nothing is queued again;
- the same key with a different body is refused, 422 `idempotency_key_reuse`, naming the job the
  key belongs to;
- a retry while the first request is still being validated gets 409 `idempotency_conflict` with
  `Retry-After`;
- a request that queued nothing (a refused workflow, a full queue) records nothing: its key stays
  free, as Stripe records nothing for a request that failed validation.

The keys live in the v2 SQLite file beside the queue, so they outlive a restart as the jobs do; at
most `MAX_KEYS` are kept, none older than `TTL_S` (the contract's 24 h). A claim whose request
died with an earlier process (or one kept by a nodegraph that recorded no response) is settled on
its next use: replayed from the job when that job was queued, else taken over by the new request.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

TTL_S = 24 * 3600.0
MAX_KEYS = 10_000
RETRY_AFTER_S = 1
REPLAYED = {"Idempotency-Replayed": "true"}


@dataclass(frozen=True)
class Claim:
    """The request a key was first used for and, once it is known, its response."""

    key: str
    request_hash: str | None  # None: kept by an older nodegraph, which recorded no hash
    job_id: str | None
    status: int | None  # None while that request is in flight (or died with its process)
    body: str | None
    created: float


def request_hash(body: Any) -> str:
    """The body's fingerprint: key order and whitespace do not make a request different. ASCII
    escapes keep a lone surrogate (a JSON `\ud800`) hashable."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class IdempotencyKeys:
    """The claimed keys, in the SQLite file `db` (shared with the asset index, under its `lock`)."""

    def __init__(
        self,
        db: sqlite3.Connection,
        lock: threading.Lock,
        *,
        ttl_s: float = TTL_S,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._db, self._lock = db, lock
        self.ttl_s, self.max_keys = ttl_s, max_keys
        self._in_flight: set[str] = set()  # keys whose first request this process is handling
        with lock:
            db.execute(
                "CREATE TABLE IF NOT EXISTS v2_idempotency (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                "key TEXT UNIQUE NOT NULL, request_hash TEXT, job_id TEXT, status INTEGER, body TEXT, "
                "created REAL NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS v2_idempotency_created ON v2_idempotency(created)")
            self._adopt_single_use_keys()

    def _adopt_single_use_keys(self) -> None:
        """Keep the keys of the table an older nodegraph wrote (single-use keys: no hash, no body)."""
        old = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='idempotency_keys'"
        if self._db.execute(old).fetchone() is None:
            return
        self._db.execute("BEGIN")
        self._db.execute(
            "INSERT OR IGNORE INTO v2_idempotency (key, job_id, created) SELECT key, job_id, "
            "COALESCE((julianday(created_at) - 2440587.5) * 86400.0, ?) FROM idempotency_keys ORDER BY seq",
            (time.time(),),
        )
        self._db.execute("DROP TABLE idempotency_keys")
        self._db.execute("COMMIT")

    def claim(self, key: str, hash_: str, job_id: str) -> Claim | None:
        """Claim `key` for a new request that will queue `job_id`: None when the key is now this
        request's, else the claim that holds it. Expired keys are dropped first."""
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM v2_idempotency WHERE created < ?", (now - self.ttl_s,))
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO v2_idempotency (key, request_hash, job_id, created) "
                "VALUES (?, ?, ?, ?)",
                (key, hash_, job_id, now),
            )
            if cursor.rowcount == 1:
                self._in_flight.add(key)
                newest = "(SELECT MAX(seq) FROM v2_idempotency)"
                self._db.execute(f"DELETE FROM v2_idempotency WHERE seq <= {newest} - ?", (self.max_keys,))
                return None
            row = self._db.execute(
                "SELECT key, request_hash, job_id, status, body, created FROM v2_idempotency WHERE key=?",
                (key,),
            ).fetchone()
        return Claim(*row)

    def in_flight(self, key: str) -> bool:
        with self._lock:
            return key in self._in_flight

    def take_over(self, key: str, hash_: str, job_id: str) -> bool:
        """Make an abandoned claim (no response, no request of this process) this request's."""
        with self._lock:
            if key in self._in_flight:
                return False
            cursor = self._db.execute(
                "UPDATE v2_idempotency SET request_hash=?, job_id=?, created=? "
                "WHERE key=? AND status IS NULL",
                (hash_, job_id, time.time(), key),
            )
            if cursor.rowcount != 1:
                return False
            self._in_flight.add(key)
            return True

    def record(self, key: str, status: int, body: str) -> None:
        """Keep the response to replay for this key."""
        with self._lock:
            self._in_flight.discard(key)
            self._db.execute("UPDATE v2_idempotency SET status=?, body=? WHERE key=?", (status, body, key))

    def release(self, key: str) -> None:
        """Forget a key whose request queued nothing, so the client may use it again."""
        with self._lock:
            self._in_flight.discard(key)
            self._db.execute("DELETE FROM v2_idempotency WHERE key=?", (key,))


Refuse = Callable[..., web.Response]  # routes_v2.v2_error: (status, code, message, **details)
JobLookup = Callable[[str], dict[str, Any] | None]  # a job id -> its v2 body, None when unknown


def replay(status: int, body: str) -> web.Response:
    return web.Response(text=body, status=status, content_type="application/json", headers=REPLAYED)


def answer_resend(
    keys: IdempotencyKeys, claim: Claim, hash_: str, job_id: str, job: JobLookup, refuse: Refuse
) -> web.Response | None:
    """The answer to a request whose key is claimed already, or None when this request took over
    an abandoned claim and goes on to queue `job_id`. Blocking (SQLite, the queue): run in a thread."""
    if claim.request_hash is not None and claim.request_hash != hash_:
        return refuse(
            422,
            "idempotency_key_reuse",
            f"This Idempotency-Key was used for a different request (job {claim.job_id}); "
            "send a new key with a new request.",
            job_id=claim.job_id,
        )
    if claim.status is not None and claim.body is not None:
        return replay(claim.status, claim.body)
    if not keys.in_flight(claim.key):  # abandoned: its process stopped before it answered
        found = job(claim.job_id) if claim.job_id else None
        if found is not None:  # it was queued: answer with the job as it is now
            body = json.dumps(found)
            keys.record(claim.key, 201, body)
            return replay(201, body)
        if keys.take_over(claim.key, hash_, job_id):
            return None
    conflict = refuse(
        409,
        "idempotency_conflict",
        "A request with this Idempotency-Key is still being handled; retry shortly to get its answer.",
    )
    conflict.headers["Retry-After"] = str(RETRY_AFTER_S)
    return conflict
