"""How conversation messages look in the chat: one display message per conversation message.

Edits and ‹ › address messages by index, so nothing here adds or drops a message:
- a user message with files shows a chip per file above its text (and, for a searched file, the
  passages sent, quoted with file and page, folded);
- an assistant message's reasoning is collapsed (``webui.reasoning``);
- a tool call shows as a titled box with its arguments (open while it waits for the user's
  approval), a tool's result as a folded box under it.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from loadstar.webui.reasoning import OPEN, show_reasoning

DECLINED = "The user declined this call: it did not run. Answer without it."  # the tool message of a rejected call
_CHIPS = re.compile(r'^<div class="attachments">.*?</div><!--/attachments-->\n\n', re.DOTALL)


def chips(attachments: list[dict[str, Any]]) -> str:
    parts = []
    for a in attachments:
        icon = {"pdf": "📕", "docx": "📘"}.get(a.get("kind", ""), "📄")
        cls = "attachment-chip" + ("" if a.get("fit") == "whole" else " attachment-partial")
        parts.append(f'<span class="{cls}">{icon} {html.escape(_summary(a))}</span>')
        quotes = a.get("quotes") or []
        if quotes:
            quoted = "\n\n".join(
                f"**{html.escape(a['name'])}{', page ' + str(q['page']) if q.get('page') else ''}**\n\n"
                + "\n".join(f"> {html.escape(line)}" for line in _short(q["text"]).splitlines())
                for q in quotes)
            parts.append(f'<details class="quotes"><summary>Passages sent from {html.escape(a["name"])}</summary>'
                         f"\n\n{quoted}\n\n</details>")
    return f'<div class="attachments">{"".join(parts)}</div><!--/attachments-->\n\n'


def without_chips(text: str) -> str:
    """A displayed user message's own text (the inverse of what ``chips`` added)."""
    return _CHIPS.sub("", text, count=1)


def _summary(a: dict[str, Any]) -> str:
    tokens = f"{a.get('tokens', 0):,} tokens"
    how = {"cut": f" · cut to {a.get('sent_tokens', 0):,}",
           "searched": f" · searched, {_passages(len(a.get('quotes') or []))} sent"}.get(a.get("fit", ""), "")
    return f"{a['name']} · {tokens}{how}"


def _passages(count: int) -> str:
    return f"{count} passage{'' if count == 1 else 's'}"


def _short(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def call_text(call: dict[str, Any]) -> str:
    try:
        arguments = json.dumps(json.loads(call.get("arguments") or "{}"), ensure_ascii=False, indent=1)
    except ValueError:
        arguments = str(call.get("arguments"))
    return f"```json\n{arguments}\n```"


def displayed(messages: list[dict[str, Any]], waiting: bool = False) -> list[dict[str, Any]]:
    """Conversation messages as the chat shows them. ``waiting``: the last tool calls await approval."""
    names = {c["id"]: c["name"] for m in messages for c in m.get("tool_calls") or []}
    shown: list[dict[str, Any]] = []
    for index, m in enumerate(messages):
        role, content = m.get("role"), str(m.get("content") or "")
        if role == "user":
            files = m.get("attachments") or []
            shown.append({"role": "user", "content": (chips(files) if files else "") + content})
        elif role == "tool":
            name = names.get(m.get("tool_call_id") or "", "the tool")
            declined = content == DECLINED
            title = f"{'🚫 Declined' if declined else '📋 Result of'}: {name}"
            shown.append({"role": "assistant", "content": content or "(empty result)",
                          "metadata": {"title": title, "status": "done"}})
        elif role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            pending = waiting and index == len(messages) - 1
            said = show_reasoning(content) + "\n\n" if content.strip() else ""
            title = "🔧 Tool call: " + ", ".join(c["name"] for c in calls) + (" (waiting for you)" if pending else "")
            shown.append({"role": "assistant", "content": said + "\n\n".join(call_text(c) for c in calls),
                          "metadata": {"title": title, "status": "pending" if pending else "done"}})
        elif role == "assistant":
            shown.append({"role": "assistant", "content": show_reasoning(content) if OPEN in content else content})
        else:
            shown.append({"role": "assistant", "content": content})
    return shown
