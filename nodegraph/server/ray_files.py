"""Output files of a Ray worker whose folders are not the server's: collected there, placed here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodegraph.folders import safe_join

MAX_SHIPPED_FILE = 512 * 1024 * 1024
UI = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ShippedFile:
    """An output file a remote worker wrote, sent back to the server."""

    kind: str  # "output" or "temp"
    subfolder: str
    filename: str
    data: bytes


def collect(ui: UI, roots: dict[str, Path]) -> Iterator[ShippedFile]:
    """The files a prompt's UI outputs name (images, latents ...), read from the worker's folders."""
    for value in ui.values():
        for entries in value.values():
            for entry in entries if isinstance(entries, list) else ():
                if not isinstance(entry, dict) or entry.get("type") not in roots:
                    continue
                kind = str(entry["type"])
                subfolder, filename = str(entry.get("subfolder") or ""), str(entry.get("filename", ""))
                path = safe_join(roots[kind], str(Path(subfolder) / filename))
                if path.is_file() and path.stat().st_size <= MAX_SHIPPED_FILE:
                    yield ShippedFile(kind, subfolder, filename, path.read_bytes())


def place(files: list[ShippedFile], ui: UI, roots: dict[str, Path]) -> UI:
    """Write shipped files into the server's folders (a new name if one is taken by other content)
    and return the UI outputs naming them where they now are."""
    renamed: dict[tuple[str, str, str], str] = {}
    for shipped in files:
        path = safe_join(roots[shipped.kind], str(Path(shipped.subfolder) / shipped.filename))
        final = _free_name(path, shipped.data)
        final.parent.mkdir(parents=True, exist_ok=True)
        if not final.exists():
            partial = final.with_name(final.name + ".partial")
            partial.write_bytes(shipped.data)
            partial.replace(final)
        renamed[(shipped.kind, shipped.subfolder, shipped.filename)] = final.name
    if not renamed:
        return ui
    return {
        node: {
            key: [_renamed(entry, renamed) for entry in entries] if isinstance(entries, list) else entries
            for key, entries in value.items()
        }
        for node, value in ui.items()
    }


def _free_name(path: Path, data: bytes) -> Path:
    """`path`, or the same name with a counter, such that no other file's content is overwritten."""
    candidate, n = path, 1
    while candidate.exists() and candidate.read_bytes() != data:
        candidate = path.with_name(f"{path.stem}_w{n}{path.suffix}")
        n += 1
    return candidate


def _renamed(entry: Any, renamed: dict[tuple[str, str, str], str]) -> Any:
    if not isinstance(entry, dict):
        return entry
    key = (str(entry.get("type")), str(entry.get("subfolder") or ""), str(entry.get("filename")))
    return {**entry, "filename": renamed[key]} if key in renamed else entry
