"""Where LoRA weights are actually changed: inside the consumer, restored exactly afterwards.

PLACEHOLDER until the LoRA work lands: yields the module unchanged. The signature is the contract
the sampler and the text encoder call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from nodes.sd.handles import LoraRef


@contextmanager
def patched(module: Any, loras: Sequence[LoraRef], *, target: Literal["unet", "te"]) -> Iterator[Any]:
    """Apply `loras` (in order) to `module`'s weights for the duration of the block."""
    yield module
