"""The canvas's dynamic prompts, applied when a UI workflow is converted server-side.

ComfyUI's frontend rewrites text widgets flagged `dynamicPrompts` when it queues a prompt: comments
are stripped and each `{a|b|c}` group becomes one random choice. The backend never does this, so
API prompts arrive already rewritten; a UI workflow converted here must get the same treatment.
"""

from __future__ import annotations

import random
import re

_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//.*")
_ESCAPED = re.compile(r"\\([{}|])")


def dynamic_prompt(text: str, rng: random.Random | None = None) -> str:
    """The frontend's dynamic prompts: strip `/* */` and `//` comments, replace each `{a|b|c}` (nested
    too) by one random choice; `\\{`, `\\|`, `\\}` stay literal. A port of `processDynamicPrompt`."""
    chooser = rng or random.Random()
    return _ESCAPED.sub(r"\1", _expand(_COMMENTS.sub("", text), chooser))


def _expand(text: str, rng: random.Random) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        i += 1
        if char == "\\":
            out.append("\\" + text[i : i + 1])
            i += 1
        elif char == "{":
            options, i = _choice_block(text, i)
            out.append(_expand(rng.choice(options), rng))
        else:
            out.append(char)
    return "".join(out)


def _choice_block(text: str, i: int) -> tuple[list[str], int]:
    """The options of the `{...}` block starting at `i` (just after the brace), and where it ends."""
    options: list[str] = []
    choice: list[str] = []
    depth = 0
    while i < len(text):
        char = text[i]
        i += 1
        if char == "\\":
            choice.append("\\" + text[i : i + 1])
            i += 1
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            if not depth:
                break
            depth -= 1
        elif char == "|" and not depth:
            options.append("".join(choice))
            choice = []
            continue
        choice.append(char)
    options.append("".join(choice))
    return options, i
