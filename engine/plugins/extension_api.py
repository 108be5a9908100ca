"""The objects extension hooks receive: drafts they may change in place, and UI contributions.

pluggy hands every implementation the same arguments and does not chain return values, so hooks
that change something (a request, a reply) get a mutable draft, and each extension edits it in
turn. The engine turns the draft back into frozen, validated values afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from loadstar.engine.metrics import MetricsSnapshot
    from loadstar.engine.models.loader_api import LoadedModelInfo
    from loadstar.engine.settings import Settings


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
                self.messages[i] = self.messages[i].model_copy(update={"content": text})  # files stay attached
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
    ``context`` is a ``PluginContext``: a few engine services and the page's shared components.
    """

    title: str
    build: Callable[[PluginContext], None]
    placement: Literal["tab", "panel"] = "tab"


@dataclass(frozen=True)
class PluginContext:
    """What a UI contribution may use: a few engine services, not the engine itself.

    ``components`` are named components of the page (``"chat"``, ``"status"``, ...), for events
    that read or write them. Ask for a service here before reaching for anything else: what is
    not on this class may change without notice.
    """

    settings: Settings
    loaded_model: Callable[[], LoadedModelInfo | None]  # the model loaded now, or None
    metrics: Callable[[], MetricsSnapshot]  # generation counters since the start
    components: Mapping[str, Any] = field(default_factory=dict)
