"""How the CLI shows a run: a tqdm bar fed by Progress events, warnings once each, errors as paragraphs."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nodegraph import events as ev
from nodegraph.folders import Folders
from nodegraph.validate import Validation


class CliError(Exception):
    """A failure the CLI reports as one paragraph (no traceback)."""


# What to do about each validation error type, appended to its line.
HINTS = {
    "required_input_missing": "connect it or give it a value",
    "bad_linked_input": 'fix the link: it must be ["node_id", output_index] to an existing node',
    "exception_during_inner_validation": "fix the link to an existing node",
    "return_type_mismatch": "connect an output of the input's type",
    "invalid_input_type": "give a value of the input's type",
    "value_smaller_than_min": "use a value within the input's range",
    "value_bigger_than_max": "use a value within the input's range",
    "value_not_in_list": "pick one of the listed values",
    "dependency_cycle": "remove a link so that no node depends on itself",
}
PROMPT_HINTS = {
    "prompt_no_outputs": "add an output node such as SaveImage or PreviewImage",
    "invalid_prompt": "`nodegraph nodes` lists the node types nodegraph has; replace or remove this one",
}


class Reporter:
    """Receives the executor's events and shows them on the terminal."""

    def __init__(self, verbose: bool = False, source: str | None = None) -> None:
        self.verbose = verbose
        self.source = f"{source}: " if source else ""  # the workflow file, named in each warning
        self.node: str | None = None
        self.class_type = ""
        self.bar: tqdm[Any] | None = None
        self.warned: set[tuple[str, str]] = set()

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Executing):
            self._close_bar()
            self.node, self.class_type = event.node, event.class_type
            if self.verbose:
                tqdm.write(f"running node {event.node} ({event.class_type})", file=sys.stderr)
        elif isinstance(event, ev.Progress):
            self._progress(event)
        elif isinstance(event, ev.NodeWarning) and (event.node, event.message) not in self.warned:
            self.warned.add((event.node, event.message))
            tqdm.write(f"warning: {self.source}node {event.node}: {event.message}", file=sys.stderr)
        elif isinstance(event, ev.ExecutionCached) and event.nodes and self.verbose:
            tqdm.write(f"cached: {', '.join(event.nodes)}", file=sys.stderr)

    def _progress(self, event: ev.Progress) -> None:
        if self.bar is None or self.bar.total != event.max:
            self._close_bar()
            label = f"{event.node} {self.class_type}" if event.node == self.node else event.node
            self.bar = tqdm(total=event.max, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.update(event.value - self.bar.n)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def describe_validation(checked: Validation, prompt: Mapping[str, Any]) -> list[str]:
    """One line per validation problem: node id, class, input, what is wrong and what to do."""
    lines: list[str] = []
    if checked.error is not None and checked.error["type"] != "prompt_outputs_failed_validation":
        err = checked.error
        hint = PROMPT_HINTS.get(err["type"], "")
        lines.append(f"{err['message']} {err['details']}".strip() + (f" ({hint})" if hint else ""))
    for node_id, entry in checked.node_errors.items():
        for err in entry["errors"]:
            name = (err.get("extra_info") or {}).get("input_name")
            where = f"node {node_id} ({entry['class_type']})" + (f", input '{name}'" if name else "")
            hint = HINTS.get(err["type"], "")
            if err["type"] == "value_not_in_list" and _names_a_file(err.get("details", "")):
                hint += "; model files go in their models folder, images in the input folder"
            detail = f": {err['details']}" if err.get("details") else ""
            lines.append(f"{where}: {err['message']}{detail}" + (f" ({hint})" if hint else ""))
    return lines


def describe_error(error: ev.ExecutionError | ev.ExecutionInterrupted, verbose: bool) -> str:
    """The paragraph for a failed or interrupted run."""
    if isinstance(error, ev.ExecutionInterrupted):
        return f"interrupted at node {error.node_id} ({error.node_type})"
    text = (
        f"node {error.node_id} ({error.node_type}) failed: {error.exception_type}: {error.message}\n"
        "Check this node's inputs and the files it reads, then run again"
    )
    if verbose:
        return text + ".\n" + "".join(error.traceback).rstrip()
    return text + " (--verbose shows the traceback)."


def written_files(outputs: Mapping[str, Mapping[str, Any]], folders: Folders) -> Iterator[Path]:
    """Files a run saved to the output folder, from the nodes' UI outputs (images, latents ...)."""
    for ui in outputs.values():
        for items in ui.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and item.get("type") == "output" and "filename" in item:
                    yield folders.output_dir / str(item.get("subfolder") or "") / str(item["filename"])


def _names_a_file(details: str) -> bool:
    """Whether a not-in-list value looks like a file name (a checkpoint, LoRA or image)."""
    value = details.split(": ", 1)[-1].split("'")[1] if "'" in details else ""
    return "." in value.rsplit("/", 1)[-1]
