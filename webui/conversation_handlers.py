"""Conversation list handlers: new, open, rename, delete, search, export and import.

Each returns plain values; ``ui.py`` maps them onto components. Choices for the conversation
dropdown are ``(label, id)`` pairs, newest first.
"""

from __future__ import annotations

import time
from typing import Any

from loadstar.engine.chat.conversations import Conversation
from loadstar.engine.errors import LoadstarError, one_line
from loadstar.engine.facade import Engine
from loadstar.webui.chat_handlers import State, chat_messages, new_state
from loadstar.webui.uploads import uploaded_file


def when(timestamp: float, now: float | None = None) -> str:
    """A short date for the list: the time today, the day this year, else the date."""
    moment, today = time.localtime(timestamp), time.localtime(now)
    if moment[:3] == today[:3]:
        return time.strftime("%H:%M", moment)
    if moment.tm_year == today.tm_year:
        return time.strftime("%b %d", moment)
    return time.strftime("%Y-%m-%d", moment)


class ConversationHandlers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.conversations

    def choices(self, user: str | None) -> list[tuple[str, str]]:
        return [(f"{c.title} · {when(c.updated)}", c.id) for c in self.store.summaries(user)]

    def start(self, user: str | None) -> tuple[State, list[tuple[str, str]]]:
        """A session starts with a new conversation (two open pages never write one file); the
        saved ones are in the list."""
        return new_state(), self.choices(user)

    def new(self, user: str | None) -> tuple[State, str]:
        return new_state(), "New conversation: it is saved with its first message."

    def open(self, user: str | None, conversation_id: str | None) -> tuple[State | None, str]:
        if not conversation_id:
            return None, ""
        try:
            return self.store.load(user, conversation_id).model_dump(), ""
        except LoadstarError as error:
            return None, f"⚠️ {error}"

    def rename(self, user: str | None, state: State, title: str) -> tuple[State, str]:
        if not chat_messages(state):
            return state, "Say something first: an empty conversation is not saved."
        try:
            return self.store.rename(user, state["id"], title).model_dump(), "Renamed."
        except LoadstarError as error:
            return state, f"⚠️ {error}"

    def delete(self, user: str | None, state: State) -> tuple[State, str]:
        try:
            self.store.delete(user, state["id"])
        except LoadstarError as error:
            return state, f"⚠️ {error}"
        return self.start(user)[0], f"Deleted “{state.get('title', '')}”."

    def search(self, user: str | None, query: str) -> list[tuple[str, str]]:
        """Matching conversations as list choices: the title, then the words around the match."""
        return [(f"{hit.title} — “{hit.snippet}”", hit.id) for hit in self.store.search(user, query or "")]

    def export(self, user: str | None, state: State) -> tuple[str | None, str]:
        """A JSON file of the open conversation, for the browser to download."""
        if not chat_messages(state):
            return None, "Nothing to export yet."
        try:
            path = self.engine.export_conversation(user, Conversation.model_validate(state))
        except (OSError, ValueError) as error:
            return None, f"⚠️ cannot export: {one_line(error)}"
        return str(path), "Exported."

    def import_(self, user: str | None, file: Any) -> tuple[State | None, str]:
        path = getattr(file, "name", file)
        if not path:
            return None, ""
        try:
            return self.engine.import_conversation(user, uploaded_file(path)).model_dump(), "Imported as a new conversation."
        except LoadstarError as error:
            return None, f"⚠️ {error}"
