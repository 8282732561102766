"""The canvas's dynamic prompts, applied when a UI workflow is converted server-side.

ComfyUI's frontend rewrites text widgets flagged `dynamicPrompts` when it queues a prompt: comments
are stripped and each `{a|b|c}` group becomes one random choice. The backend never does this, so
API prompts arrive already rewritten; a UI workflow converted here must get the same treatment.

Both steps are single passes over the text. The frontend's comment regex (`/\\*[\\s\\S]*?\\*/|//.*`)
rescans to the end of the text at every unclosed `/*`, and its recursive expansion rescans each
group once per level it is nested in: a 60 KB widget took 7 s and a megabyte would hold a validation
thread for hours. Nesting is bounded (`MAX_NESTING`), so no text can recurse deeper either.
"""

from __future__ import annotations

import random
import re

MAX_NESTING = 100  # `{...}` groups inside each other; the canvas's own prompts use a handful
_COMMENT_START = re.compile(r"/[*/]")
_PLAIN = re.compile(r"[^\\{}|]+")
_ESCAPED = re.compile(r"\\([{}|])")


class DynamicPromptError(ValueError):
    """A text whose `{...}` groups nest deeper than `MAX_NESTING`."""


def dynamic_prompt(text: str, rng: random.Random | None = None) -> str:
    """The frontend's dynamic prompts: strip `/* */` and `//` comments, replace each `{a|b|c}` (nested
    too) by one random choice; `\\{`, `\\|`, `\\}` stay literal. A port of `processDynamicPrompt`.

    Raises:
        DynamicPromptError: the groups nest deeper than MAX_NESTING.
    """
    chooser = rng or random.Random()
    return _ESCAPED.sub(r"\1", _expand(strip_comments(text), chooser))


def strip_comments(text: str) -> str:
    """`text` without `/* ... */` and `// ...` (to the end of the line), as the frontend's regex
    removes them: an unclosed `/*` stays as it is."""
    out: list[str] = []
    i, unclosed = 0, False
    while (found := _COMMENT_START.search(text, i)) is not None:
        start = found.start()
        if text[start + 1] == "/":
            out.append(text[i:start])
            end = text.find("\n", start)
            i = len(text) if end < 0 else end
            continue
        end = -1 if unclosed else text.find("*/", start + 2)
        if end < 0:  # no `*/` after this one: none after any later `/*` either
            unclosed = True
            out.append(text[i : start + 1])
            i = start + 1
            continue
        out.append(text[i:start])
        i = end + 2
    out.append(text[i:])
    return "".join(out)


def _expand(text: str, rng: random.Random) -> str:
    """Each `{a|b}` group replaced by one of its options, innermost first (the same choices as the
    frontend's outermost-first recursion: a nested group is one option's text either way)."""
    # groups[k] holds the options of the k-th open group, each a list of parts; groups[0] is the text
    groups: list[list[list[str]]] = [[[]]]
    i, end = 0, len(text)
    while i < end:
        plain = _PLAIN.match(text, i)
        if plain is not None:
            groups[-1][-1].append(plain.group())
            i = plain.end()
            continue
        char = text[i]
        if char == "\\":
            groups[-1][-1].append(text[i : i + 2])
            i += 2
            continue
        i += 1
        if char == "{":
            if len(groups) > MAX_NESTING:
                raise DynamicPromptError(f"the text nests {{...}} groups deeper than {MAX_NESTING} levels")
            groups.append([[]])
        elif char == "}" and len(groups) > 1:
            options = groups.pop()
            groups[-1][-1].append("".join(rng.choice(options)))
        elif char == "|" and len(groups) > 1:
            groups[-1].append([])
        else:  # a `}` or `|` outside any group is text
            groups[-1][-1].append(char)
    while len(groups) > 1:  # groups left open at the end close there, as the frontend's do
        options = groups.pop()
        groups[-1][-1].append("".join(rng.choice(options)))
    return "".join(groups[0][0])
