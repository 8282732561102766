"""The prompt queue and the history, kept in one SQLite file so a restart loses neither.

ComfyUI keeps both in memory: a crash or a restart drops every pending prompt and the whole
history. Here each change is one committed transaction. The worker thread blocks in `take()`;
HTTP handlers call the other methods (from a thread pool, so a slow disk never stalls the event loop).

A prompt that was running when the process died is queued again once at the next start; if it
was already retried once (it may be what killed the process), it goes to the history as an error.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodegraph.server.jobs import duration, history_job

log = logging.getLogger(__name__)
MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT UNIQUE NOT NULL,
    number REAL NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0
);
-- take(): the next pending prompt from an index, not a scan and sort of every queued prompt
-- (with thousands queued that scan held the store's lock for milliseconds on every take).
CREATE INDEX IF NOT EXISTS queue_next ON queue (state, number, seq);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT UNIQUE NOT NULL,
    entry TEXT NOT NULL
);
"""
# `/api/jobs` columns: the job record and its sort and filter keys, so listing 10,000 entries
# reads small rows through an index instead of parsing every entry's prompt and workflow.
_JOB_COLUMNS = {
    "job": "TEXT",
    "status": "TEXT",
    "create_time": "INTEGER",
    "duration": "INTEGER",
    "workflow_id": "TEXT",
}
# Covering indexes: a listing reads only index pages, never the rows (whose entries are large).
_JOB_INDEXES = """
CREATE INDEX IF NOT EXISTS history_jobs_created ON history (status, create_time, prompt_id, workflow_id);
CREATE INDEX IF NOT EXISTS history_jobs_duration ON history (status, duration, prompt_id, workflow_id);
"""
# Plain columns (an expression would keep SQLite from reading them in index order); NULL sorts as 0.
SORT_COLUMNS = {"created_at": "create_time", "execution_duration": "duration"}


@dataclass(frozen=True)
class QueueItem:
    """One queued prompt: ComfyUI's `(number, prompt_id, prompt, extra_data, outputs_to_execute)`."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        """The wire form used by `/queue` and history entries."""
        number: float | int = int(self.number) if float(self.number).is_integer() else self.number
        return [number, self.prompt_id, self.prompt, public_extra_data(self.extra_data), self.outputs]


def public_extra_data(extra_data: dict[str, Any]) -> dict[str, Any]:
    """extra_data without the secrets ComfyUI also strips before showing or storing it."""
    return {k: v for k, v in extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}


def _connect(path: Path | None) -> sqlite3.Connection:
    """Open (None: in memory), set up and check the database; raises DatabaseError if damaged."""
    db = sqlite3.connect(
        ":memory:" if path is None else str(path), check_same_thread=False, isolation_level=None
    )
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        problem = db.execute("PRAGMA quick_check").fetchone()
        if problem is None or problem[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {problem and problem[0]}")
    except BaseException:
        db.close()
        raise
    return db


def _dumps(value: Any) -> str:
    # Node UI outputs should be JSON already; `default=str` keeps a stray object from losing a history entry.
    return json.dumps(value, default=str)


class PromptStore:
    """Pending and running prompts plus finished history, persisted in SQLite."""

    def __init__(self, path: Path | str, *, max_history: int = MAXIMUM_HISTORY_SIZE) -> None:
        self.path = Path(path)
        self.max_history = max_history
        self.moved_aside: Path | None = None
        self._unsaved: dict[str, dict[str, Any]] = {}  # history the disk refused (full): kept here
        self._db = self._open()
        self._add_job_columns()
        self._cond = threading.Condition()
        self._closed = False
        row = self._db.execute("SELECT MAX(number) FROM queue").fetchone()
        hist = self._db.execute("SELECT COUNT(*) FROM history").fetchone()
        self._counter = int(max(row[0] or 0, 0)) + int(hist[0]) + 1
        # Rows in the queue table, kept beside it: the queue size is asked for on every queue change
        # (each status broadcast), and a COUNT there waited for the lock the worker holds.
        self._rows = int(self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0])
        self.recovered = self._recover()

    def _open(self) -> sqlite3.Connection:
        """The database; a damaged one is moved aside (named in the log) and a new one started,
        and where even that cannot be written, an in-memory queue keeps the server up (D9)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return _connect(self.path)
        except (sqlite3.DatabaseError, OSError) as exc:
            if "locked" in str(exc):  # a good file another server holds: never moved aside
                raise RuntimeError(f"the queue database {self.path} is in use by another process") from exc
            damage = exc
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            self.path.rename(aside)
            for extra in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + extra)
                if side.exists():
                    side.rename(aside.with_name(aside.name + extra))
            self.moved_aside = aside
            log.error(
                "the queue database %s cannot be used (%s); moved it aside to %s and started an "
                "empty queue and history (the old file is kept for recovery)",
                self.path, damage, aside,
            )  # fmt: skip
            return _connect(self.path)
        except (sqlite3.DatabaseError, OSError) as exc:
            log.error(
                "the queue database %s cannot be used (%s) nor moved aside (%s); the queue and history "
                "live in memory until the server stops: fix the file or the folder's permissions",
                self.path, damage, exc,
            )  # fmt: skip
            return _connect(None)

    # ---------------------------------------------------------------- queue

    def put(
        self,
        prompt_id: str,
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
        outputs: list[str],
        *,
        number: float | None = None,
        front: bool = False,
    ) -> QueueItem:
        """Queue a prompt; `number` orders it (lower first), else the next counter (negated: front)."""
        with self._cond:
            if number is None:
                number = float(-self._counter if front else self._counter)
            self._counter += 1
            self._db.execute(
                "INSERT INTO queue (prompt_id, number, prompt, extra_data, outputs) VALUES (?, ?, ?, ?, ?)",
                (prompt_id, number, _dumps(prompt), _dumps(extra_data), _dumps(outputs)),
            )
            self._rows += 1
            self._cond.notify_all()
        return QueueItem(number, prompt_id, prompt, extra_data, outputs)

    def take(self, timeout: float | None = None) -> QueueItem | None:
        """Mark the first pending prompt running and return it; None after `timeout` or on close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                row = self._db.execute(
                    "SELECT seq FROM queue WHERE state='pending' ORDER BY number, seq LIMIT 1"
                ).fetchone()
                if row is not None:
                    self._db.execute("UPDATE queue SET state='running', attempts=attempts+1 WHERE seq=?", row)
                    return self._items("WHERE seq=?", row)[0]
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
        return None

    def pending(self) -> list[QueueItem]:
        return self._items("WHERE state='pending' ORDER BY number, seq")

    def running(self) -> list[QueueItem]:
        return [
            i for i in self._items("WHERE state='running' ORDER BY seq") if i.prompt_id not in self._unsaved
        ]

    def remaining(self) -> int:
        """Pending plus running, ComfyUI's `queue_remaining`."""
        count = self._rows
        if not self._unsaved:
            return count
        with self._cond:
            ghosts = [(p,) for p in self._unsaved]
            if ghosts:
                count -= sum(
                    1
                    for g in ghosts
                    if self._db.execute("SELECT 1 FROM queue WHERE prompt_id=?", g).fetchone()
                )
            return count

    def state_of(self, prompt_id: str) -> str | None:
        """'pending', 'running', 'done' (in history) or None for an id never seen (or deleted)."""
        with self._cond:
            row = self._db.execute("SELECT state FROM queue WHERE prompt_id=?", (prompt_id,)).fetchone()
            if row is not None:
                return str(row[0])
            found = self._db.execute("SELECT 1 FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        return "done" if found else None

    def queued_item(self, prompt_id: str) -> QueueItem | None:
        items = self._items("WHERE prompt_id=?", (prompt_id,))
        return items[0] if items else None

    def delete_pending(self, prompt_ids: Iterable[str]) -> list[str]:
        """Remove pending prompts by id; a running prompt is not touched (interrupt it instead)."""
        removed = []
        with self._cond:
            for pid in prompt_ids:
                cur = self._db.execute("DELETE FROM queue WHERE prompt_id=? AND state='pending'", (str(pid),))
                if cur.rowcount:
                    removed.append(str(pid))
                    self._rows -= cur.rowcount
        return removed

    def clear_pending(self) -> list[str]:
        with self._cond:
            rows = self._db.execute("SELECT prompt_id FROM queue WHERE state='pending'").fetchall()
            self._rows -= self._db.execute("DELETE FROM queue WHERE state='pending'").rowcount
        return [str(r[0]) for r in rows]

    def requeue(self, prompt_id: str) -> None:
        """Put a running prompt back in front of the queue, uncounted (the server is stopping under it)."""
        with self._cond:
            self._db.execute(
                "UPDATE queue SET state='pending', attempts=MAX(attempts-1, 0) WHERE prompt_id=?",
                (prompt_id,),
            )

    def finish(self, prompt_id: str, entry: dict[str, Any]) -> None:
        """Move a running prompt to the history and trim the oldest entries.

        If the disk refuses (full), the entry is kept in memory and shown by the history routes,
        and the prompt leaves the queue all the same: never a ghost left "running" (D10). The
        kept entries are written with the next history write that succeeds.
        """
        with self._cond:
            try:
                for pid, kept in list(self._unsaved.items()):
                    self._write_history(pid, kept)
                    del self._unsaved[pid]
                self._write_history(prompt_id, entry)
            except sqlite3.Error:
                self._unsaved[prompt_id] = entry
                try:  # a delete needs little space; if even that fails, the filters below hide it
                    cur = self._db.execute("DELETE FROM queue WHERE prompt_id=?", (prompt_id,))
                    self._rows -= cur.rowcount
                except sqlite3.Error:
                    pass
                raise

    def _write_history(self, prompt_id: str, entry: dict[str, Any]) -> None:
        with self._cond:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                dequeued = self._db.execute("DELETE FROM queue WHERE prompt_id=?", (prompt_id,)).rowcount
                self._db.execute("DELETE FROM history WHERE prompt_id=?", (prompt_id,))
                self._db.execute(
                    "INSERT INTO history (prompt_id, entry, job, status, create_time, duration, workflow_id) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (prompt_id, _dumps(entry), *_job_row(prompt_id, entry)),
                )
                self._db.execute(  # an index range on seq, not a scan of the whole history
                    "DELETE FROM history WHERE seq <= "
                    "(SELECT seq FROM history ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (self.max_history,),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._rows -= dequeued

    # ---------------------------------------------------------------- history

    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, Any]:
        """`GET /history`: oldest first; `max_items` alone gives the newest N (ComfyUI's rule)."""
        with self._cond:
            if max_items is not None and offset is None:
                rows = self._db.execute(
                    "SELECT prompt_id, entry FROM "
                    "(SELECT * FROM history ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                    (max_items,),
                ).fetchall()
            else:
                limit = -1 if max_items is None else max_items
                rows = self._db.execute(
                    "SELECT prompt_id, entry FROM history ORDER BY seq LIMIT ? OFFSET ?", (limit, offset or 0)
                ).fetchall()
            found = {str(pid): json.loads(entry) for pid, entry in rows}
            return found | dict(self._unsaved)

    def history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        with self._cond:
            if prompt_id in self._unsaved:
                return dict(self._unsaved[prompt_id])
            row = self._db.execute("SELECT entry FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def describe(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry, or for a queued prompt a stub whose status_str is pending or running."""
        with self._cond:
            entry = self.history_entry(prompt_id)
            if entry is not None:
                return entry
            row = self._db.execute("SELECT state FROM queue WHERE prompt_id=?", (prompt_id,)).fetchone()
            item = self.queued_item(prompt_id)
        if row is None or item is None:
            return None
        status = {"status_str": str(row[0]), "completed": False, "messages": []}
        return {"prompt": item.as_list(), "outputs": {}, "status": status}

    # ---------------------------------------------------------------- jobs (`/api/jobs`)

    def job_keys(
        self,
        statuses: Iterable[str],
        workflow_id: str | None,
        sort_by: str,
        descending: bool,
        limit: int | None,
    ) -> list[tuple[int, int, str]]:
        """(sort key, seq, prompt_id) of the first `limit` finished jobs in that order."""
        where, args = self._job_filter(statuses, workflow_id)
        order = "DESC" if descending else "ASC"
        query = (
            f"SELECT {SORT_COLUMNS[sort_by]}, seq, prompt_id FROM history {where} "
            f"ORDER BY {SORT_COLUMNS[sort_by]} {order}, seq ASC LIMIT ?"
        )
        with self._cond:
            rows = self._db.execute(query, (*args, -1 if limit is None else limit)).fetchall()
        return [(int(k or 0), int(seq), str(pid)) for k, seq, pid in rows]

    def job_count(self, statuses: Iterable[str], workflow_id: str | None) -> int:
        where, args = self._job_filter(statuses, workflow_id)
        with self._cond:
            return int(self._db.execute(f"SELECT COUNT(*) FROM history {where}", args).fetchone()[0])

    def jobs(self, prompt_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored job records of finished prompts, by id."""
        found: dict[str, dict[str, Any]] = {}
        with self._cond:
            for start in range(0, len(prompt_ids), 500):
                chunk = prompt_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT prompt_id, job FROM history WHERE prompt_id IN ({marks})", chunk
                ).fetchall()
                found.update((str(pid), json.loads(job)) for pid, job in rows)
        return found

    @staticmethod
    def _job_filter(statuses: Iterable[str], workflow_id: str | None) -> tuple[str, tuple[Any, ...]]:
        wanted = tuple(statuses)
        clauses = [f"status IN ({','.join('?' * len(wanted))})"] if wanted else ["0"]
        args: tuple[Any, ...] = wanted
        if workflow_id:
            clauses.append("workflow_id = ?")
            args += (workflow_id,)
        return "WHERE " + " AND ".join(clauses), args

    def _add_job_columns(self) -> None:
        """Add the job columns to a queue file written before they existed, and fill them in."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(history)")}
        for name, kind in _JOB_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE history ADD COLUMN {name} {kind}")
        self._db.executescript(_JOB_INDEXES)
        for prompt_id, entry in self._db.execute(
            "SELECT prompt_id, entry FROM history WHERE job IS NULL"
        ).fetchall():
            self._db.execute(
                "UPDATE history SET job=?, status=?, create_time=?, duration=?, workflow_id=? "
                "WHERE prompt_id=?",
                (*_job_row(str(prompt_id), json.loads(entry)), prompt_id),
            )

    def delete_history(self, prompt_ids: Iterable[str]) -> None:
        with self._cond:
            for pid in prompt_ids:
                self._db.execute("DELETE FROM history WHERE prompt_id=?", (str(pid),))

    def clear_history(self) -> None:
        with self._cond:
            self._db.execute("DELETE FROM history")

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Wake a waiting worker and close the database; pending prompts stay for the next start."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._db.close()

    def _items(self, where: str, args: tuple[Any, ...] = ()) -> list[QueueItem]:
        with self._cond:
            rows = self._db.execute(
                f"SELECT number, prompt_id, prompt, extra_data, outputs FROM queue {where}", args
            ).fetchall()
        return [
            QueueItem(float(n), str(p), json.loads(pr), json.loads(ex), json.loads(out))
            for n, p, pr, ex, out in rows
        ]

    def fail_recovered(self, prompt_id: str, message: str, node_id: str, node_type: str) -> None:
        """Move a requeued prompt (one of `recovered`) to the history as failed, with `message`."""
        items = self._items("WHERE prompt_id=? AND state='pending'", (prompt_id,))
        if not items:
            return
        self.finish(prompt_id, crashed_entry(items[0], message, node_id, node_type))
        if prompt_id in self.recovered:
            self.recovered.remove(prompt_id)

    def _recover(self) -> list[str]:
        """Requeue prompts left running by a dead process; fail those that were already retried."""
        rows = self._db.execute("SELECT prompt_id, attempts FROM queue WHERE state='running'").fetchall()
        requeued = []
        for prompt_id, attempts in rows:
            if attempts >= 2:
                item = self._items("WHERE prompt_id=?", (prompt_id,))[0]
                self.finish(prompt_id, crashed_entry(item))
            else:
                self._db.execute("UPDATE queue SET state='pending' WHERE prompt_id=?", (prompt_id,))
                requeued.append(str(prompt_id))
        return requeued


def _job_row(prompt_id: str, entry: dict[str, Any]) -> tuple[str, str, Any, int, Any]:
    """(job JSON, status, create_time, duration, workflow_id) for the history's job columns."""
    job = history_job(prompt_id, entry)
    return _dumps(job), job["status"], job.get("create_time"), duration(job), job.get("workflow_id")


def crashed_entry(
    item: QueueItem, message: str | None = None, node_id: str | None = None, node_type: str | None = None
) -> dict[str, Any]:
    """The history entry of a prompt the server's death stopped and that is not run again: by default
    one that stopped the server twice; else `message` says why (e.g. a training run's kept files)."""
    message = message or (
        "the server stopped twice while this prompt was running, so it was not retried again; "
        "check the server log, then queue it again"
    )
    data: dict[str, Any] = {
        "prompt_id": item.prompt_id,
        "node_id": node_id,
        "node_type": node_type,
        "executed": [],
        "exception_message": message,
        "exception_type": "ServerRestart",
        "traceback": [],
        "current_inputs": {},
        "current_outputs": [],
        "timestamp": int(time.time() * 1000),
    }
    return {
        "prompt": item.as_list(),
        "outputs": {},
        "status": {"status_str": "error", "completed": False, "messages": [["execution_error", data]]},
        "meta": {},
    }
