"""A prompt's big tensors estimated against free memory, before it is queued and before each node runs (D7).

EmptyLatentImage 16384x16384 x64 or EmptyImage 16384x16384 are legal inputs; allocated on a
machine with less free memory they get the server OOM-killed (and the restart retried the same
prompt). A node with integer `width` and `height` inputs that outputs an image, latent or mask
makes tensors of that size, `batch_size` (or `amount`, `length`) of them; decoded to float32 RGB
that is what the prompt will hold at least once. Other nodes' widths and heights are numbers, not
tensor sizes (CLIPTextEncodeSDXL's size conditioning, ConditioningSetArea's area) and never count.
A prompt whose estimate is over the memory available is refused naming the node.

The server checks the literal sizes when a prompt is queued (`memory_errors`); the executor checks
each node's resolved inputs just before it runs (`check_node`), which catches sizes that arrive over
a link (a primitive node, a math node) and prompts run from the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodegraph.node import Node
    from nodegraph.registry import Registry

BYTES_PER_PIXEL = 3 * 4  # float32 RGB, ComfyUI's IMAGE
BATCH_INPUTS = ("batch_size", "amount", "length")
SIZED_OUTPUTS = frozenset({"IMAGE", "LATENT", "MASK"})  # socket types whose tensors width x height sizes


def available_memory() -> int | None:
    """Bytes the process can still allocate: MemAvailable, bounded by a cgroup limit if any."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            pass
    try:  # cgroup v2: what is left under memory.max
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def makes_sized_tensors(cls: type[Node]) -> bool:
    """Whether a node's `width` and `height` size what it makes: it outputs an image, latent or mask."""
    return any(output.type.name in SIZED_OUTPUTS for output in cls.OUTPUTS)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def node_estimate(inputs: Mapping[str, Any]) -> tuple[str, int] | None:
    """(what, bytes) of the images a node with these inputs makes; None without integer width and height."""
    width, height = _int(inputs.get("width")), _int(inputs.get("height"))
    if width is None or height is None:
        return None
    batch = next((b for b in (_int(inputs.get(k)) for k in BATCH_INPUTS) if b is not None), 1)
    return f"{batch} x {width}x{height}", max(width, 0) * max(height, 0) * max(batch, 1) * BYTES_PER_PIXEL


def estimate(prompt: dict[str, Any], registry: Registry) -> list[tuple[str, str, int]]:
    """(node id, what, bytes) for every node that makes images of a given size."""
    found = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            continue
        cls = registry.get(str(node.get("class_type")))
        if cls is None or not makes_sized_tensors(cls):
            continue
        inputs = node.get("inputs")
        if isinstance(inputs, dict) and (sized := node_estimate(inputs)) is not None:
            found.append((str(node_id), *sized))
    return found


def _message(what: str, size: int, free: int) -> str:
    return (
        f"{what} images need about {size / 2**30:.1f} GiB as float32, more than the "
        f"{free / 2**30:.1f} GiB of memory free; use a smaller size or batch"
    )


class OverMemoryBudget(MemoryError):
    """A node's inputs ask for images larger than the memory left (raised before it allocates)."""


def check_node(cls: type[Node], inputs: Mapping[str, Any], available: int | None = None) -> None:
    """Raise `OverMemoryBudget` when the images a `cls` node with these resolved inputs makes cannot fit."""
    sized = node_estimate(inputs) if makes_sized_tensors(cls) else None
    if sized is None:
        return
    free = available_memory() if available is None else available
    if free is not None and sized[1] > free:
        raise OverMemoryBudget(_message(sized[0], sized[1], free))


def memory_errors(prompt: dict[str, Any], registry: Registry, available: int | None = None) -> dict[str, Any]:
    """ComfyUI-shaped node_errors for nodes whose images cannot fit in the available memory."""
    sized = estimate(prompt, registry)
    if not sized:  # most prompts: no free-memory read (a file read per queued prompt)
        return {}
    free = available_memory() if available is None else available
    if free is None:
        return {}
    errors: dict[str, Any] = {}
    for node_id, what, size in sized:
        if size <= free:
            continue
        error = {
            "type": "out_of_memory",
            "message": _message(what, size, free),
            "details": "",
            "extra_info": {},
        }
        class_type = prompt[node_id].get("class_type") if isinstance(prompt[node_id], dict) else None
        errors[node_id] = {"errors": [error], "dependent_outputs": [], "class_type": class_type}
    return errors
