"""Saved conversations: one JSON file each, written atomically after every turn.

A conversation lives in ``<data dir>/conversations/<user>/<id>.json``; ``<user>`` is the login
name (or ``local`` without logins), so users of one server never see each other's chats. Files are
replaced through a synced temporary file and a rename, so a crash or a kill during a save leaves
the previous version whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loadstar.engine.atomic import login_folder_name, private_folder, remove_stale_temps, write_atomic
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import BadRequestError, problem_line
from loadstar.engine.untrusted_json import UntrustedJsonError, parse_untrusted_json

log = logging.getLogger(__name__)

FORMAT = "loadstar-conversation/1"
MAX_ALTERNATIVES = 20  # versions kept of one regenerated reply
MAX_IMPORT_BYTES = 20 * 1024 * 1024
_ID = re.compile(r"^[0-9a-f]{16}$")


ReplyEnd = Literal["stop", "length", "cancelled", "tool_calls", "error", "interrupted"]


class ReplyStats(BaseModel):
    """How one version of a reply was made, shown under it. ``interrupted``: the page went away
    while it was written (what had come is kept); ``cancelled``: the user pressed Stop."""

    model_config = ConfigDict(extra="ignore")

    first_token_s: float | None = Field(None, ge=0, allow_inf_nan=False, description="Start to first token (prompt read).")
    tokens_per_s: float = Field(0.0, ge=0, allow_inf_nan=False, description="Decode speed after the first token.")
    tokens: int = Field(0, ge=0)
    end: ReplyEnd = "stop"
    model: str = Field("", max_length=300)


def version_key(text: str) -> str:
    """The key of one version of a reply (its text's hash) in ``Conversation.reply_stats``."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class Conversation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: str = FORMAT
    id: str = Field(default_factory=lambda: secrets.token_hex(8), pattern=_ID.pattern)
    title: str = Field("New chat", max_length=200)
    system: str = Field("", max_length=100_000, description="The system message; empty = the format's default.")
    messages: list[ChatMessage] = Field(default_factory=list, max_length=100_000)
    created: float = Field(default_factory=time.time, allow_inf_nan=False)
    updated: float = Field(default_factory=time.time, allow_inf_nan=False)
    # Every version of a regenerated reply, by message index, oldest first; the message's own text
    # is the version in use (the one the model sees in later turns).
    alternatives: dict[int, list[str]] = Field(default_factory=dict, max_length=10_000)
    allowed_tools: list[str] = Field(default_factory=list, max_length=1000, description=(
        "Tools the user let run without asking, in this conversation."))
    # How each version of a reply was made, by message index and ``version_key`` of the version.
    reply_stats: dict[int, dict[str, ReplyStats]] = Field(default_factory=dict, max_length=100_000)
    character: str | None = Field(None, max_length=80, description="The character this conversation is with (its id).")

    @model_validator(mode="after")
    def _alternatives_follow_the_messages(self) -> Conversation:
        kept = {}
        for index, versions in self.alternatives.items():
            if 0 <= index < len(self.messages) and self.messages[index].role == "assistant":
                current = self.messages[index].content
                versions = [v for v in versions if isinstance(v, str)][-MAX_ALTERNATIVES:]
                kept[index] = versions if current in versions else [*versions, current][-MAX_ALTERNATIVES:]
        self.alternatives = {i: v for i, v in kept.items() if len(v) > 1}
        stats = {}
        for index, by_version in self.reply_stats.items():
            if 0 <= index < len(self.messages) and self.messages[index].role == "assistant":
                known = {version_key(v) for v in self.alternatives.get(index) or [self.messages[index].content]}
                mine = {key: value for key, value in by_version.items() if key in known}
                if mine:
                    stats[index] = mine
        self.reply_stats = stats
        return self

    def stats(self, index: int) -> ReplyStats | None:
        """How the version in use of message ``index`` was made, when known."""
        if not 0 <= index < len(self.messages):
            return None
        return (self.reply_stats.get(index) or {}).get(version_key(self.messages[index].content))

    def alternative(self, index: int) -> tuple[int, int]:
        """(position of the version in use, how many versions) of message ``index``; (0, 1) if one."""
        versions = self.alternatives.get(index)
        if not versions:
            return 0, 1
        return versions.index(self.messages[index].content), len(versions)

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        """What the model sees: the system message (when set) and the turns."""
        system = (ChatMessage(role="system", content=self.system),) if self.system.strip() else ()
        return (*system, *self.messages)


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    updated: float
    turns: int


@dataclass(frozen=True)
class SearchHit:
    id: str
    title: str
    snippet: str


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return (line[:60] + "…") if len(line) > 60 else line or "New chat"


class ConversationStore:
    def __init__(self, root: Path, exports: Path | None = None) -> None:
        self.root = root
        self.exports = exports or root.parent / "exports"
        self._cleaned: set[str] = set()

    def folder(self, user: str | None) -> Path:
        """The login's own folder, 0700 (its files are 0600): other accounts on the machine read nothing."""
        name = login_folder_name(user)
        folder = private_folder(self.root, name)
        if name not in self._cleaned:  # saves killed mid-write leave hidden temp files: once per login
            self._cleaned.add(name)
            removed = remove_stale_temps(folder)
            if removed:
                log.info("removed %d temporary files of interrupted saves in %s", removed, folder)
        return folder

    def export_file(self, user: str | None, conversation: Conversation, extra: dict[str, Any] | None = None) -> Path:
        """The conversation as JSON in the login's own exports folder (0700/0600), replacing the last
        export. ``extra``: more top-level fields (the conversation's character)."""
        folder = private_folder(self.exports, login_folder_name(user), conversation.id)
        for old in folder.glob("*.json"):
            old.unlink()
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in conversation.title)[:40] or "chat"
        path = folder / f"{safe}.json"
        data = conversation.model_dump(mode="json")
        write_atomic(path, json.dumps({**data, **(extra or {})}, indent=1, ensure_ascii=False).encode("utf-8"))
        return path

    def summaries(self, user: str | None) -> list[ConversationSummary]:
        """The user's conversations, most recently updated first (unreadable files are skipped)."""
        found = []
        for conversation in self._all(user):
            found.append(ConversationSummary(conversation.id, conversation.title, conversation.updated,
                                             len(conversation.messages)))
        return sorted(found, key=lambda c: c.updated, reverse=True)

    def load(self, user: str | None, conversation_id: str) -> Conversation:
        path = self._path(user, conversation_id)
        try:
            return Conversation.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise BadRequestError(f"no conversation {conversation_id}") from None
        except (OSError, ValidationError, ValueError) as error:
            raise BadRequestError(f"conversation {conversation_id} cannot be read: {error.__class__.__name__}") from None

    def save(self, user: str | None, conversation: Conversation) -> Conversation:
        """Write ``conversation`` (atomically) with a fresh ``updated`` time; returns what was written."""
        stamped = conversation.model_copy(update={"updated": time.time()})
        write_atomic(self._path(user, stamped.id), stamped.model_dump_json(indent=1).encode("utf-8"))
        return stamped

    def rename(self, user: str | None, conversation_id: str, title: str) -> Conversation:
        title = " ".join((title or "").split())
        if not title:
            raise BadRequestError("a conversation needs a title")
        if len(title) > 200:
            raise BadRequestError("a title is at most 200 characters")
        return self.save(user, self.load(user, conversation_id).model_copy(update={"title": title}))

    def delete(self, user: str | None, conversation_id: str) -> None:
        path = self._path(user, conversation_id)
        if not path.exists():
            raise BadRequestError(f"no conversation {conversation_id}")
        path.unlink()

    def search(self, user: str | None, query: str, limit: int = 50) -> list[SearchHit]:
        """Conversations whose title, system message or any message contains every word of ``query``."""
        words = [w.casefold() for w in query.split()]
        if not words:
            return []
        hits = []
        for conversation in sorted(self._all(user), key=lambda c: c.updated, reverse=True):
            texts = [conversation.title, conversation.system, *(m.content for m in conversation.messages)]
            folded = "\n".join(texts).casefold()
            if all(word in folded for word in words):
                hits.append(SearchHit(conversation.id, conversation.title, _snippet(texts, words[0])))
            if len(hits) >= limit:
                break
        return hits

    def export(self, user: str | None, conversation_id: str) -> bytes:
        return self.load(user, conversation_id).model_dump_json(indent=1).encode("utf-8")

    def import_(
        self, user: str | None, data: bytes, adopt: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> Conversation:
        """Save an exported conversation as a new one (a fresh id: an import never overwrites).
        ``adopt(raw)``: the id of the character the file brings (saved by the caller), or None."""
        _check_import_size(len(data))
        try:
            raw = parse_untrusted_json(data, "the file")  # bounded in depth: never a RecursionError
        except UntrustedJsonError as error:
            raise BadRequestError(f"the file is not JSON that can be read ({error.why}): export a conversation "
                                  "from Loadstar to import it") from None
        if isinstance(raw, list):  # a bare list of {"role", "content"} messages
            raw = {"messages": raw}
        if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
            raise BadRequestError("the file holds no conversation: expected an object with a 'messages' list")
        character = adopt(raw) if adopt is not None and raw.get("character") else None
        raw = {key: value for key, value in raw.items() if key not in ("id", "format", "character")}
        raw["character"] = character
        try:
            conversation = Conversation.model_validate(raw)
        except ValidationError as error:
            raise BadRequestError(f"the conversation is not valid: {problem_line(error)}") from None
        if conversation.title == "New chat" and conversation.messages:
            conversation = conversation.model_copy(update={"title": title_from(conversation.messages[0].content)})
        return self.save(user, conversation)

    def import_file(
        self, user: str | None, path: Path, adopt: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> Conversation:
        """``import_`` for a file, refused by its size before it is read into memory."""
        try:
            _check_import_size(path.stat().st_size)
            data = path.read_bytes()
        except OSError as error:
            raise BadRequestError(f"cannot read the file: {error.strerror or error}") from None
        return self.import_(user, data, adopt)

    def _path(self, user: str | None, conversation_id: str) -> Path:
        if not _ID.match(conversation_id or ""):
            raise BadRequestError("not a conversation id")
        return self.folder(user) / f"{conversation_id}.json"

    def _all(self, user: str | None) -> list[Conversation]:
        found = []
        for path in self.folder(user).glob("*.json"):
            try:
                found.append(Conversation.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError, ValueError) as error:
                log.warning("skipping unreadable conversation %s: %s", path.name, error.__class__.__name__)
        return found


def _check_import_size(size: int) -> None:
    if size > MAX_IMPORT_BYTES:
        raise BadRequestError(f"the file is larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB")


def _snippet(texts: list[str], word: str, width: int = 60) -> str:
    for text in texts:
        at = text.casefold().find(word)
        if at >= 0:
            start = max(0, at - width // 2)
            piece = " ".join(text[start : start + width].split())
            return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")
    return ""
