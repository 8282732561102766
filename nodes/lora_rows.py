"""rgthree's Power Lora Loader rows, read torch-free: which rows apply, to which file, at which strengths.

A row is an input `lora_N` holding `{"on": bool, "lora": name, "strength": s, "strengthTwo": s2}`.
`strength` is the model's; `strengthTwo`, when present and not null, the CLIP's, else `strength`
counts for both (rgthree's rule). A row applies when it is on and a strength is not 0. Its name is
found as rgthree finds it (`match_lora`): the exact name, then without extension, then by file name,
then by file name without extension, then as a substring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any


@dataclass(frozen=True)
class PowerRow:
    """One row that applies: its input name, the file it means and (strength_model, strength_clip)."""

    key: str
    file: str
    strengths: tuple[float, float]
    clip_ignored: bool = False  # a clip strength was given for a node without a CLIP input


def _stem(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    return str(path.with_suffix("")) if path.suffix else str(path)


def match_lora(names: Sequence[str], wanted: str) -> str | None:
    """The name among `names` (the loras folder) that a row's `lora` means, by rgthree's rules."""
    wanted = wanted.replace("\\", "/")
    base = PurePosixPath(wanted).name
    rules: tuple[tuple[str, Any], ...] = (
        (wanted, lambda n: n),
        (wanted, _stem),
        (_stem(wanted), _stem),
        (wanted, lambda n: PurePosixPath(n).name),
        (base, lambda n: PurePosixPath(n).name),
        (wanted, lambda n: _stem(PurePosixPath(n).name)),
        (_stem(base), lambda n: _stem(PurePosixPath(n).name)),
    )
    for target, key in rules:
        found = next((n for n in names if key(n) == target), None)
        if found is not None:
            return found
    return next((n for n in names if wanted in n), None) if wanted else None


def _is_row(key: str, value: Any) -> bool:
    return key.upper().startswith("LORA_") and isinstance(value, dict)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape_problem(key: str, row: Mapping[str, Any]) -> str | None:
    for field in ("on", "lora", "strength"):
        if field not in row:
            return f"{key} has no '{field}' (a row is {{on, lora, strength, strengthTwo}})"
    if not _number(row["strength"]):
        return f"{key}: strength {row['strength']!r} is not a number"
    if row.get("strengthTwo") is not None and not _number(row["strengthTwo"]):
        return f"{key}: strengthTwo {row['strengthTwo']!r} is not a number"
    if row["lora"] is not None and not isinstance(row["lora"], str):
        return f"{key}: lora {row['lora']!r} is not a file name"
    return None


def _applies(row: Mapping[str, Any], has_clip: bool) -> tuple[float, float, bool] | None:
    """(strength_model, strength_clip, clip_ignored) of a row that applies, else None."""
    s_model = float(row["strength"])
    two = row.get("strengthTwo")
    s_clip = s_model if two is None else float(two)
    ignored = False
    if not has_clip:
        ignored = two is not None and float(two) != 0
        s_clip = 0.0
    if not row["on"] or (s_model == 0 and s_clip == 0):
        return None
    if row["lora"] in (None, "", "None"):
        return None  # a row without a LoRA picked: the canvas shows "None"
    return s_model, s_clip, ignored


def power_rows(inputs: Mapping[str, Any], names: Sequence[str], has_clip: bool) -> list[PowerRow]:
    """The rows of a Power Lora Loader that apply, in input order.

    Raises:
        ValueError: a row is malformed or names a LoRA the loras folder does not hold.
    """
    rows: list[PowerRow] = []
    for key, value in inputs.items():
        if not _is_row(key, value):
            continue
        problem = _shape_problem(key, value)
        if problem:
            raise ValueError(problem)
        applied = _applies(value, has_clip)
        if applied is None:
            continue
        found = match_lora(names, value["lora"])
        if found is None:
            raise ValueError(
                f"{key}: no LoRA named '{value['lora']}' in the loras folder; "
                "put the file there, pick another, or switch the row off"
            )
        rows.append(PowerRow(key, found, (applied[0], applied[1]), applied[2]))
    return rows


def row_problem(inputs: Mapping[str, Any], names: Sequence[str]) -> str | None:
    """Why the rows cannot run (a malformed row, a missing LoRA), or None."""
    try:
        power_rows(inputs, names, has_clip=True)
    except ValueError as exc:
        return str(exc)
    return None
