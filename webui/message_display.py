"""How conversation messages look in the chat: one display message per conversation message.

Edits and ‹ › address messages by index, so nothing here adds or drops a message:
- a user message with files shows a chip per file above its text (and, for a searched file, the
  passages sent, quoted with file and page, folded);
- an assistant message's reasoning is collapsed (``webui.reasoning``);
- a tool call shows as a titled box with its arguments (open while it waits for the user's
  approval), a tool's result as a folded box under it;
- a reply shows the character's name and picture above it (in a conversation with one), and a
  line under it: its versions (‹ 2/3 ›, the page's script sends clicks on them to the server)
  and how it was made (time to first token, decode speed, tokens, how it ended).

What is added around a message's own text is marked (``<!--/speaker-->``, ``<!--/meta-->``):
``own_text`` removes it for an edit, and the page's script for the copy buttons and the edit box.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from typing import Any

from loadstar.engine.chat.conversations import version_key
from loadstar.webui.reasoning import OPEN, show_reasoning

DECLINED = "The user declined this call: it did not run. Answer without it."  # the tool message of a rejected call
_CHIPS = re.compile(r'^<div class="attachments">.*?</div><!--/attachments-->\n\n', re.DOTALL)
_SPEAKER = re.compile(r'^<div class="speaker">.*?</div><!--/speaker-->\n\n', re.DOTALL)
_META = re.compile(r'\n\n<div class="reply-meta[^"]*">.*?</div><!--/meta-->$', re.DOTALL)
ENDINGS = {"length": "cut at max new tokens", "cancelled": "stopped", "error": "failed",
           "interrupted": "interrupted: the page was left while it was written"}


@dataclass(frozen=True)
class Speaker:
    """Who the replies are from, in a conversation with a character."""

    name: str
    has_picture: bool = False


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


def own_text(text: str) -> str:
    """A displayed message's own text: without file chips, speaker line and reply line."""
    return _META.sub("", _SPEAKER.sub("", without_chips(text), count=1), count=1)


def speaker_line(speaker: Speaker) -> str:
    picture = '<span class="speaker-picture"></span>' if speaker.has_picture else ""
    return f'<div class="speaker">{picture}<b>{html.escape(speaker.name)}</b></div><!--/speaker-->\n\n'


def reply_line(index: int, position: int, count: int, stats: dict[str, Any] | None) -> str:
    """Under a reply: its versions with ‹ › (when it has several) and how it was made."""
    parts = []
    if count > 1:
        prev_off = " ls-off" if position == 0 else ""
        next_off = " ls-off" if position >= count - 1 else ""
        parts.append(f'<span class="versions"><button class="ls-prev{prev_off}" title="Previous version">‹</button>'
                     f"<span>{position + 1}/{count}</span>"
                     f'<button class="ls-next{next_off}" title="Next version">›</button></span>')
    if stats:
        made = []
        if stats.get("first_token_s") is not None:
            made.append(f"{stats['first_token_s']:.2f} s to first token")
        if stats.get("tokens"):
            made.append(f"{stats.get('tokens_per_s', 0):.1f} tokens/s")
            made.append(f"{stats['tokens']} tokens")
        ending = ENDINGS.get(str(stats.get("end")))
        if made:
            parts.append(f'<span class="stats">{" · ".join(made)}</span>')
        if ending:
            parts.append(f'<span class="ending">{html.escape(ending)}</span>')
    if not parts:
        return ""
    return f'\n\n<div class="reply-meta ls-at-{index}">{"".join(parts)}</div><!--/meta-->'


def reply_lines(state: dict[str, Any], messages: list[dict[str, Any]]) -> dict[int, str]:
    """The line under each reply of ``messages`` that is the saved one in ``state`` (not one being written)."""
    saved = state.get("messages") or []
    alternatives = state.get("alternatives") or {}
    stats = state.get("reply_stats") or {}
    lines = {}
    for index, m in enumerate(messages):
        if m.get("role") != "assistant" or m.get("tool_calls") or index >= len(saved):
            continue
        content = m.get("content") or ""
        if saved[index].get("content") != content:
            continue
        versions = alternatives.get(index) or []
        position = versions.index(content) if content in versions else 0
        made = (stats.get(index) or {}).get(version_key(content))
        line = reply_line(index, position, max(len(versions), 1), made)
        if line:
            lines[index] = line
    return lines


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


def displayed(
    messages: list[dict[str, Any]], waiting: bool = False, lines: dict[int, str] | None = None,
    speaker: Speaker | None = None,
) -> list[dict[str, Any]]:
    """Conversation messages as the chat shows them. ``waiting``: the last tool calls await
    approval; ``lines``: the line under each reply (``reply_lines``); ``speaker``: the character."""
    lines = lines or {}
    said_by = speaker_line(speaker) if speaker else ""
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
            text = show_reasoning(content) if OPEN in content else content
            shown.append({"role": "assistant", "content": said_by + text + lines.get(index, "")})
        else:
            shown.append({"role": "assistant", "content": content})
    return shown
