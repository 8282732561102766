"""JSON nesting of a .safetensors header, checked on the bytes before json.loads recurses.

Torch-free, so `nodes.lora_info` (which must not import torch) uses it too.
"""

from __future__ import annotations

import numpy as np

# Nesting allowed in a header: {name: {"shape": [..]}} is depth 3; `__metadata__` is flat strings.
MAX_HEADER_DEPTH = 4


def json_depth_ok(raw: bytes, limit: int) -> bool:
    """False if the JSON text nests deeper than `limit` (checked on the bytes, before json.loads
    recurses: a 100,000-deep header would otherwise be a RecursionError). Vectorised: a crafted
    100 MB header must not cost minutes of Python loop either."""
    # Without escaped backslashes and quotes, quotes alternate open/close, and brackets count
    # only outside strings (pairs are consumed left to right, as JSON reads escapes).
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = quotes = 0
    for start in range(0, len(text), 1 << 20):
        chunk = np.frombuffer(text[start : start + (1 << 20)], dtype=np.uint8)
        is_quote = chunk == 0x22
        outside = ((np.cumsum(is_quote) + quotes) & 1) == 0
        quotes += int(is_quote.sum())
        opens = outside & ((chunk == 0x5B) | (chunk == 0x7B))
        closes = outside & ((chunk == 0x5D) | (chunk == 0x7D))
        levels = np.cumsum(opens.astype(np.int32) - closes.astype(np.int32)) + depth
        if levels.size and int(levels.max()) > limit:
            return False
        depth = int(levels[-1]) if levels.size else depth
    return True
