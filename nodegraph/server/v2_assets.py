"""Comfy API v2 assets: UUID records over files in the input and output folders, with blake3 hashes.

An upload (`POST /api/v2/assets`) lands in the input folder, where LoadImage finds it; a job's
outputs become asset records when a job body lists them, so `GET /api/v2/assets/{id}/content`
serves both. Uploads are hashed while they stream in, which is what lets a client skip sending
bytes the server already has (`HEAD /api/v2/assets/by-hash/{hash}`, `POST .../from-hash`);
an output's hash is computed the first time its record is read on its own (the v2 contract lets
the hash be null on the job-polling path). The index is a small SQLite file beside the queue.
"""

from __future__ import annotations

import mimetypes
import posixpath
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nodegraph.folders import PathEscapeError, safe_join
from nodegraph.server.v2_idempotency import IdempotencyKeys

ASSETS_FILE = "v2_assets.sqlite"
# Output assets get stable ids: the same output listed twice is the same record.
OUTPUT_NAMESPACE = uuid.UUID("5d0b6a4e-8f0c-4a57-9d37-6f1c2a9e0b11")
CHUNK = 1 << 16


@dataclass(frozen=True)
class AssetRecord:
    """One asset: where its bytes are (`folder` is input, output or temp; `name` is relative)."""

    id: str
    hash: str | None
    size_bytes: int
    content_type: str
    file_path: str
    folder: str
    name: str
    created_at: str
    job_id: str | None = None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def new_digest() -> Any:
    """A blake3 hasher. Imported here so a server installed without `blake3` still starts: only the
    v2 asset routes need it, and they answer with what to install."""
    try:
        import blake3
    except ImportError as exc:  # an environment installed before the dependency was added
        raise MissingHasher("the v2 asset routes need the blake3 package: pip install blake3") from exc
    return blake3.blake3()


class MissingHasher(RuntimeError):
    """blake3 is not installed."""


def file_hash(path: Path) -> str:
    """`blake3:<hex>` of a file's bytes."""
    digest = new_digest()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return "blake3:" + str(digest.hexdigest())


def content_type_of(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def clean_upload_path(raw: str) -> str:
    """The input-folder path for a client's `file_path`: relative, `/`-separated, no `..`.

    Raises:
        ValueError: naming what is wrong with it.
    """
    text = raw.replace("\\", "/").strip()
    if text.startswith("input/"):
        text = text[len("input/") :]
    norm = posixpath.normpath(text) if text else ""
    if not norm or norm in (".", "/") or norm.startswith(("/", "../")) or norm == "..":
        raise ValueError(f"file_path {raw!r} must be a relative path inside the input folder")
    if any(part.startswith(".") for part in norm.split("/")):
        raise ValueError(f"file_path {raw!r} has a hidden or dot-dot part")
    return norm


class AssetIndex:
    """The asset records, in SQLite; every method is safe to call from any thread."""

    def __init__(self, path: Path, roots: dict[str, Path]) -> None:
        self.roots = roots
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS assets (id TEXT PRIMARY KEY, hash TEXT, size INTEGER, "
            "content_type TEXT, file_path TEXT, folder TEXT, name TEXT, created_at TEXT, job_id TEXT)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS assets_hash ON assets(hash)")
        # v2 submit's Idempotency-Keys, kept in this file so a restarted server still answers a resend.
        self.keys = IdempotencyKeys(self._db, self._lock)

    def path_of(self, record: AssetRecord) -> Path | None:
        """The record's file, or None when its folder is unknown or the name escapes it."""
        root = self.roots.get(record.folder)
        if root is None:
            return None
        try:
            return safe_join(root, record.name)
        except PathEscapeError:
            return None

    def get(self, asset_id: str) -> AssetRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM assets WHERE id=?", (asset_id,)).fetchone()
        return AssetRecord(*row) if row else None

    def by_hash(self, hash_: str) -> AssetRecord | None:
        """A record with these bytes whose file is still there."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM assets WHERE hash=?", (hash_.lower(),)).fetchall()
        for row in rows:
            record = AssetRecord(*row)
            path = self.path_of(record)
            if path is not None and path.is_file():
                return record
        return None

    def add(self, record: AssetRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO assets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.hash,
                    record.size_bytes,
                    record.content_type,
                    record.file_path,
                    record.folder,
                    record.name,
                    record.created_at,
                    record.job_id,
                ),
            )

    def set_hash(self, asset_id: str, hash_: str) -> None:
        with self._lock:
            self._db.execute("UPDATE assets SET hash=? WHERE id=?", (hash_, asset_id))

    def delete(self, asset_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM assets WHERE id=?", (asset_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def output_record(self, job_id: str, item: dict[str, Any]) -> AssetRecord | None:
        """The record for one of a job's output files (`{filename, subfolder, type}`), made once."""
        folder = str(item.get("type") or "output")
        name = posixpath.join(str(item.get("subfolder") or ""), str(item["filename"]))
        asset_id = str(uuid.uuid5(OUTPUT_NAMESPACE, f"{job_id}/{folder}/{name}"))
        found = self.get(asset_id)
        if found is not None:
            return found
        record = AssetRecord(
            asset_id, None, 0, content_type_of(name), str(item["filename"]), folder, name, now_iso(), job_id
        )
        path = self.path_of(record)
        if path is None or not path.is_file():
            return None
        record = AssetRecord(**{**record.__dict__, "size_bytes": path.stat().st_size})
        self.add(record)
        return record

    def with_hash(self, record: AssetRecord) -> AssetRecord:
        """The record with its hash, computing (and keeping) it for an output that has none."""
        if record.hash is not None:
            return record
        path = self.path_of(record)
        if path is None or not path.is_file():
            return record
        hash_ = file_hash(path)
        self.set_hash(record.id, hash_)
        return AssetRecord(**{**record.__dict__, "hash": hash_})

    def place_upload(
        self, partial: Path, wanted: str, hash_: str, size: int, content_type: str
    ) -> AssetRecord:
        """Move a fully received upload into the input folder under `wanted` (a free name if taken)."""
        root = self.roots["input"]
        stem, suffix = posixpath.splitext(wanted)
        name, n = wanted, 0
        while True:
            target = safe_join(root, name)
            if not target.exists():
                break
            if target.is_file() and file_hash(target) == hash_:
                partial.unlink(missing_ok=True)  # the same bytes under the same name: keep that file
                break
            n += 1
            name = f"{stem}_{n}{suffix}"
        if partial.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.replace(target)
        record = AssetRecord(
            str(uuid.uuid4()), hash_, size, content_type, name, "input", name, now_iso(), None
        )
        self.add(record)
        return record
