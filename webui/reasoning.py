"""Reasoning blocks in replies: a model's ``<think>…</think>`` shown as a collapsed "Reasoning"
section above its answer, and turned back into the model's own text when the message is edited.

The chat keeps one display message per conversation message (edits and ‹ › address messages by
index), so the block is drawn inside the message as HTML ``<details>``, which Gradio's sanitizer keeps.
"""

from __future__ import annotations

import html
import re

OPEN, CLOSE = "<think>", "</think>"
_SHOWN = re.compile(
    r'<details class="reasoning"( open)?><summary>(?:Reasoning|Reasoning…)</summary>\n\n(.*?)\n\n</details>\n\n',
    re.DOTALL,
)


def show_reasoning(text: str) -> str:
    """``text`` with its reasoning collapsed; an unfinished block (still streaming) stays open."""
    start = text.find(OPEN)
    if start < 0:
        return text
    end = text.find(CLOSE, start)
    before = text[:start]
    if end < 0:
        thought, after, finished = text[start + len(OPEN):], "", False
    else:
        thought, after, finished = text[start + len(OPEN):end], text[end + len(CLOSE):], True
    summary = "Reasoning" if finished else "Reasoning…"
    block = (f'<details class="reasoning"{"" if finished else " open"}><summary>{summary}</summary>\n\n'
             f"{html.escape(thought.strip())}\n\n</details>\n\n")
    return before + block + after.lstrip()


def reasoning_source(text: str) -> str:
    """The model's own text for a displayed message (the inverse of ``show_reasoning``)."""
    return _SHOWN.sub(lambda m: f"{OPEN}{html.unescape(m.group(2))}{CLOSE}\n", text, count=1)
