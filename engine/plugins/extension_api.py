"""The objects extension hooks receive: drafts they may change in place, and UI contributions.

pluggy hands every implementation the same arguments and does not chain return values, so hooks
that change something (a request, a reply) get a mutable draft, and each extension edits it in
turn. The engine turns the draft back into frozen, validated values afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.sampling import SamplingParams


@dataclass
class RequestDraft:
    """A generation request before it runs; change it in place.

    ``messages`` is the conversation (the last user message is the user's text; a system message,
    if any, comes first); ``prompt`` is set instead for raw completions (the Notebook, /v1/completions).
    ``params`` is frozen: replace it, e.g. ``draft.params = draft.params.model_copy(update={...})``.
    """

    messages: list[ChatMessage]
    prompt: str | None
    params: SamplingParams
    stop: list[str]
    owner: str
    continue_last: bool = False

    @property
    def user_text(self) -> str | None:
        """The text of the last user message, if any."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), None)

    @user_text.setter
    def user_text(self, text: str) -> None:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                self.messages[i] = ChatMessage(role="user", content=text)
                return
        raise ValueError("this request has no user message")


@dataclass
class ReplyDraft:
    """A finished reply; change ``text`` in place. ``reason`` is why generation ended."""

    text: str
    reason: str
    model: str
    owner: str
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None


@dataclass(frozen=True)
class UIContribution:
    """A piece of the web UI an extension adds.

    ``build(context)`` is called inside a Gradio Blocks context (a ``gr.Tab`` for ``"tab"``, a
    ``gr.Accordion`` under the chat for ``"panel"``) and creates components and their events there.
    ``context`` is a ``UIContext``: the engine and the page's shared components.
    """

    title: str
    build: Callable[["UIContext"], None]
    placement: Literal["tab", "panel"] = "tab"


@dataclass(frozen=True)
class UIContext:
    """What a UI contribution may use: the engine, and named components of the page."""

    engine: Any
    components: dict[str, Any] = field(default_factory=dict)
