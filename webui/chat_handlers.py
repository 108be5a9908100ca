"""Chat tab handlers: plain functions over the engine. No Gradio components are built here.

A browser session holds one open conversation in ``gr.State`` as a dict (``Conversation``'s
fields); the saved copy on disk is written after every turn. The owner of a generation is the
browser session (Gradio's session hash), so Stop cancels only the requester's own generation;
conversations belong to the login name (``local`` without logins).
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from loadstar.engine.chat.attachments import MAX_FILES, ReadFile
from loadstar.engine.chat.conversations import Conversation, ReplyStats, title_from, version_key
from loadstar.engine.chat.retrieval import MARGIN, WRAPPER_TOKENS, Fitted, Overflow, fit_files
from loadstar.engine.chat.tool_calls import ToolMode, ToolUse, template_takes_tools
from loadstar.engine.errors import BadRequestError, LoadstarError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, GenerationRequest, Queued, Started
from loadstar.engine.models.loader_api import FEATURE_EMBEDDINGS
from loadstar.engine.sampling import SamplingParams, parameter_specs
from loadstar.webui.message_display import DECLINED, own_text
from loadstar.webui.reasoning import reasoning_source
from loadstar.webui.streaming import redraws, update_interval

State = dict[str, Any]  # a Conversation as a dict, kept per browser session


@dataclass(frozen=True)
class Who:
    owner: str  # the browser session: whose generation Stop cancels
    user: str | None  # the login name: whose conversations these are


def who(request: Any) -> Who:
    """Who a Gradio request comes from (``gr.Request``: its session and, with logins, its login)."""
    return Who(owner=getattr(request, "session_hash", None) or "anonymous", user=getattr(request, "username", None))


@dataclass(frozen=True)
class ChatUpdate:
    chatbot: list[dict[str, Any]]
    state: State
    status: str
    prompt: str | None = None  # the prompt sent, for the prompt viewer (None: leave it)
    keep_input: bool = False  # the message was not taken: leave it in the textbox
    running: bool = False  # a reply is being written (Send shows as Stop)
    asking: bool | None = None  # show the tool approval row (None: when the state has calls waiting)


def sampling_from_values(values: tuple[Any, ...]) -> SamplingParams:
    """Build SamplingParams from the Parameters panel's control values (in ``parameter_specs()`` order)."""
    names = [spec.name for spec in parameter_specs()]
    raw = {name: value for name, value in zip(names, values, strict=False) if value is not None}
    for spec in parameter_specs():
        if spec.kind is int and raw.get(spec.name) is not None:
            raw[spec.name] = int(raw[spec.name])
    return SamplingParams.model_validate(raw)


def stops_from_text(text: str | None) -> tuple[str, ...]:
    """Custom stop strings: one per line; ``\\n`` and ``\\t`` written out mean a newline and a tab."""
    stops = []
    for line in (text or "").splitlines():
        if line.strip():
            stops.append(codecs.decode(line, "unicode_escape") if "\\" in line else line)
    return tuple(stops)


ToolChoice = Literal["off", "auto", "required"]  # "required": the first reply of a turn must call a tool
MAX_TOOL_ROUNDS = 5  # tool calls run without asking (tools allowed always) before a reply, per turn


class PagesLeft:
    """The browser sessions whose page went away lately: a reply stopped then was interrupted, not
    stopped by its user. Kept ``keep_seconds`` (a reply ends within a token of its page going)."""

    def __init__(self, keep_seconds: float = 120.0) -> None:
        self._when: dict[str, float] = {}
        self._lock = threading.Lock()
        self._keep = keep_seconds

    def add(self, owner: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._when = {o: t for o, t in self._when.items() if now - t < self._keep}
            self._when[owner] = now

    def __contains__(self, owner: object) -> bool:
        with self._lock:
            when = self._when.get(str(owner))
        return when is not None and time.monotonic() - when < self._keep


@dataclass(frozen=True)
class Earlier:
    """The versions a reply had before it is made again, and how each was made (by version key)."""

    texts: list[str]
    stats: dict[str, Any]


@dataclass(frozen=True)
class TurnOptions:
    """What the chat's controls say about a turn besides its text and sampling parameters."""

    files: tuple[str, ...] = ()  # uploaded paths (checked: inside Gradio's upload folder)
    overflow: Overflow = "search"  # a file too long for the context: searched or cut
    tools: ToolChoice = "off"  # offer the enabled plugins' tools: "auto" (the model decides), "required"


class AnsweredCalls:
    """The ids of tool calls a decision was taken on. Two clicks on Run it send the same waiting
    call twice, each with the page's copy of the conversation: only the first claim runs it (a
    tool's side effect must not happen twice). Call ids are unique; the oldest are forgotten past
    ``keep``, long after any click could repeat them."""

    def __init__(self, keep: int = 10_000) -> None:
        self._ids: dict[str, None] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def claim(self, ids: Iterable[str]) -> bool:
        """True if none of ``ids`` was claimed before (they are now); False if any was."""
        wanted = list(ids)
        with self._lock:
            if any(call_id in self._ids for call_id in wanted):
                return False
            self._ids.update(dict.fromkeys(wanted))
            while len(self._ids) > self._keep:
                del self._ids[next(iter(self._ids))]
            return True


def pending_calls(state: State) -> list[dict[str, Any]]:
    """The tool calls of the last message, when it is an assistant's call that awaits the user."""
    messages = state.get("messages") or []
    if messages and messages[-1].get("role") == "assistant" and messages[-1].get("tool_calls"):
        return list(messages[-1]["tool_calls"])
    return []


def chat_messages(state: State) -> list[dict[str, Any]]:
    return [dict(m) for m in state.get("messages", [])]


def new_state() -> State:
    return Conversation().model_dump()


class ChatHandlers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._answered = AnsweredCalls()
        self._left = PagesLeft()

    # -- turns -----------------------------------------------------------------------------------

    def send(
        self, text: str, state: State, who: Who, params: tuple[Any, ...], stops: str,
        options: TurnOptions = TurnOptions(),
    ) -> Iterator[ChatUpdate]:
        """Append the user's message (and its files, fitted into the context) and stream the reply."""
        text = (text or "").strip()
        if not text and not options.files:
            yield ChatUpdate(chat_messages(state), state, "Type a message first.")
            return
        if self.engine.has_work(who.owner):  # keep the message out of the chat, not lost
            yield ChatUpdate(chat_messages(state), state, "Still answering: press Stop first.", keep_input=True)
            return
        if pending_calls(state):
            yield ChatUpdate(chat_messages(state), state, "The model asked to run a tool: approve or reject it first.",
                             keep_input=True)
            return
        refusal = self.refusal(options.tools)
        if refusal:  # said before anything is saved: the message stays in the box
            yield ChatUpdate(chat_messages(state), state, refusal, keep_input=True)
            return
        message: dict[str, Any] = {"role": "user", "content": text or "Read the attached file."}
        if options.files:
            try:
                fitted = self.fit(options.files, message["content"], state, params, stops, options.overflow, who.user)
            except (LoadstarError, ValidationError) as error:
                yield ChatUpdate(chat_messages(state), state, f"⚠️ {problem_line(error)}", keep_input=True)
                return
            message["attachments"] = [a.model_dump() for a in fitted.attachments]
        state = {**state, "messages": [*chat_messages(state), message]}
        if state.get("title", "New chat") == "New chat":
            state["title"] = title_from(text or options.files[0].rsplit("/", 1)[-1])
        yield from self._reply(state, who, params, stops, tools=options.tools)

    def refusal(self, tools: ToolChoice = "off") -> str | None:
        """Why a message cannot be answered now, with the way out; None when it can."""
        if self.engine.loaded is None:
            problem = self.engine.model_problem
            why = f"No model is loaded ({problem})" if problem else "No model is loaded"
            return f"⚠️ {why}: pick one in the switch above the chat, or in the **Model** tab."
        if tools != "off":
            chosen = self.engine.loaded_prompt_format()
            if chosen is not None and not template_takes_tools(chosen.format.template):
                return (f"⚠️ This model's prompt format ({chosen.format.name}) takes no tools: turn tools off in the "
                        "**Tools** panel, or load a model whose chat template takes them.")
        return None

    # -- attachments -----------------------------------------------------------------------------

    def _read(
        self, files: tuple[str, ...], text: str, state: State, params: tuple[Any, ...], stops: str,
        user: str | None = None,
    ) -> tuple[list[ReadFile], int | None]:
        """The uploaded ``files`` read, and the prompt tokens a message of ``text`` leaves free."""
        from loadstar.webui.uploads import uploaded_file

        if len(files) > MAX_FILES:
            raise BadRequestError(f"attach at most {MAX_FILES} files to one message")
        read = [self.engine.attachments.read(uploaded_file(path), Path(path).name) for path in files]
        probe = {**state, "messages": [*chat_messages(state), {"role": "user", "content": text or "…"}]}
        room, _ = self.engine.prompt_room(self._request(probe, "fit", params, stops, user=user))
        return read, room

    def fit(
        self, files: tuple[str, ...], text: str, state: State, params: tuple[Any, ...], stops: str,
        overflow: Overflow, user: str | None = None,
    ) -> Fitted:
        """The uploaded ``files`` read and fitted into the room ``text`` leaves in the context."""
        read, room = self._read(files, text, state, params, stops, user)
        info = self.engine.loaded
        embed = None
        if info is not None and FEATURE_EMBEDDINGS in info.features:
            def embed(texts: list[str]) -> list[list[float]]:
                return [list(e.vector) for e in self.engine.embed(texts)[1]]
        return fit_files(read, room if room is not None else 10**9, lambda t: self.engine.count_tokens([t])[0],
                         text, overflow, embed)

    def fit_line(
        self, files: tuple[str, ...], text: str, state: State, params: tuple[Any, ...], stops: str,
        overflow: Overflow, user: str | None = None,
    ) -> str:
        """Before sending: each file's tokens against the room left, and what happens to one that does not fit."""
        if not files:
            return ""
        try:
            read, room = self._read(files, text, state, params, stops, user)
            sizes = self.engine.count_tokens([f.text for f in read])
        except (LoadstarError, ValidationError) as error:
            return f"⚠️ {problem_line(error)}"
        notes = "".join(f" {f.notice}." for f in read if f.notice)
        listed = ", ".join(f"**{f.name}** {size:,} tokens" for f, size in zip(read, sizes, strict=True))
        if room is None:
            return f"📎 {listed}.{notes}"
        if sum(sizes) + WRAPPER_TOKENS * len(sizes) <= room * MARGIN:
            return f"📎 {listed}: fits ({room:,} tokens free in the context).{notes}"
        what = ("the parts most relevant to your message will be sent, quoted with file and page"
                if overflow == "search" else "only its beginning will be sent, with a notice")
        return f"⚠️ {listed}: more than the {max(room, 0):,} tokens free in the context: {what}.{notes}"

    # -- tools -----------------------------------------------------------------------------------

    def decide(
        self, state: State, who: Who, params: tuple[Any, ...], stops: str, decision: str,
    ) -> Iterator[ChatUpdate]:
        """The user's answer to the tool calls that wait: "approve", "always" (this tool, in this
        conversation, from now on) or "reject"; then the model goes on."""
        calls = pending_calls(state)
        if not calls:
            yield ChatUpdate(chat_messages(state), state, "No tool call is waiting.")
            return
        if self.engine.has_work(who.owner):
            yield ChatUpdate(chat_messages(state), state, "Still answering: press Stop first.")
            return
        if not self._answered.claim(c["id"] for c in calls):  # a double click: the first one runs them
            yield ChatUpdate(chat_messages(state), state, "These tool calls were answered already.", asking=False)
            return
        if decision == "always":
            allowed = list(dict.fromkeys([*(state.get("allowed_tools") or []), *(c["name"] for c in calls)]))
            state = {**state, "allowed_tools": allowed}
        messages = chat_messages(state)
        yield ChatUpdate(messages, state, "Running " + ", ".join(c["name"] for c in calls) + "…"
                         if decision != "reject" else "Declined.", asking=False)
        lines = self._answer_calls(messages, calls, run=decision != "reject")
        state = self._save({**state, "messages": messages}, who)
        yield ChatUpdate(messages, state, "⚠️ " + " ".join(lines) if lines else "Answering…")
        yield from self._reply(state, who, params, stops, tools="auto")

    def regenerate(
        self, state: State, who: Who, params: tuple[Any, ...], stops: str, tools: ToolChoice = "off",
    ) -> Iterator[ChatUpdate]:
        """Generate the last reply again; the one it replaces stays as an earlier version of it."""
        messages = chat_messages(state)
        earlier = self._versions(state, len(messages) - 1) if messages and messages[-1]["role"] == "assistant" else None
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            yield ChatUpdate(chat_messages(state), state, "Nothing to regenerate yet.")
            return
        refusal = self.refusal(tools)
        if refusal:
            yield ChatUpdate(chat_messages(state), state, refusal)
            return
        yield from self._reply({**state, "messages": messages}, who, params, stops, earlier=earlier, tools=tools)

    def switch_reply(self, state: State, who: Who, step: int, index: int | None = None) -> ChatUpdate:
        """Show the previous (step -1) or next (+1) version of reply ``index`` (the last one when
        None); the version shown is the one the model reads in later turns."""
        messages = chat_messages(state)
        if self.engine.has_work(who.owner):
            return ChatUpdate(messages, state, "Still answering: press Stop first.")
        index = len(messages) - 1 if index is None else index
        if not 0 <= index < len(messages) or messages[index]["role"] != "assistant":
            return ChatUpdate(messages, state, "That reply no longer exists.")
        conversation = Conversation.model_validate(state)
        position, count = conversation.alternative(index)
        if count < 2:
            return ChatUpdate(messages, state, "This reply has no other versions: Regenerate makes one.")
        position = min(max(position + step, 0), count - 1)
        messages[index] = {**messages[index], "content": conversation.alternatives[index][position]}
        state = self._save({**state, "messages": messages}, who)
        return ChatUpdate(messages, state, _reply_position(state, index))

    def continue_(self, state: State, who: Who, params: tuple[Any, ...], stops: str) -> Iterator[ChatUpdate]:
        """Make the last reply longer: the model goes on from its last word."""
        messages = chat_messages(state)
        if not messages or messages[-1]["role"] != "assistant":
            yield ChatUpdate(messages, state, "There is no reply to continue.")
            return
        yield from self._reply(state, who, params, stops, continue_last=True)

    def remove_last(self, state: State, who: Who) -> ChatUpdate:
        """Remove the last exchange: the last reply and the message it answered."""
        messages = chat_messages(state)
        if self.engine.has_work(who.owner):
            return ChatUpdate(messages, state, "Still answering: press Stop first.")
        if not messages:
            return ChatUpdate(messages, state, "Nothing to remove.")
        while messages and messages[-1]["role"] in ("assistant", "tool"):  # a reply, with its tool calls
            messages.pop()
        if messages and messages[-1]["role"] == "user":
            messages.pop()
        state = self._save({**state, "messages": messages}, who)
        return ChatUpdate(messages, state, "Removed the last exchange.")

    def edit(
        self, state: State, who: Who, index: int, text: Any, params: tuple[Any, ...] = (), stops: str = "",
        tools: ToolChoice = "off",
    ) -> Iterator[ChatUpdate]:
        """Replace message ``index`` with ``text``. An edited question is answered again at once:
        the answer it had becomes an earlier version of the new one, and what came after is replaced."""
        messages = chat_messages(state)
        content = reasoning_source(own_text(_text_of(text)))  # a reasoning block goes back to the model's <think>
        if not isinstance(index, int) or not 0 <= index < len(messages):
            yield ChatUpdate(messages, state, "That message no longer exists.")
            return
        if not content.strip():
            yield ChatUpdate(messages, state, "A message cannot be empty: use Remove last instead.")
            return
        role = messages[index]["role"]
        if role == "tool" or messages[index].get("tool_calls"):
            yield ChatUpdate(messages, state, "Tool calls and their results cannot be edited.")
            return
        if self.engine.has_work(who.owner):
            yield ChatUpdate(messages, state, "Still answering: press Stop first.")
            return
        messages[index] = {**messages[index], "content": content}
        refusal = self.refusal(tools) if role == "user" else None
        if role != "user" or refusal:
            state = self._save({**state, "messages": messages}, who)
            yield ChatUpdate(messages, state, refusal or "Message edited.")
            return
        following = index + 1
        answered = following < len(messages) and messages[following]["role"] == "assistant" \
            and not messages[following].get("tool_calls")
        earlier = self._versions(state, following) if answered else None
        yield from self._reply({**state, "messages": messages[: index + 1]}, who, params, stops, earlier=earlier,
                               tools=tools)

    def pick_character(self, state: State, who: Who, character_id: str | None) -> ChatUpdate:
        """Talk with a character (None: with none). A conversation that has begun is kept as it
        is: the character gets a new one. Its greeting opens the chat."""
        character = self.engine.characters.get(who.user, character_id) if character_id else None
        if character_id and character is None:
            return ChatUpdate(chat_messages(state), state, "That character no longer exists.")
        if self.engine.has_work(who.owner):
            return ChatUpdate(chat_messages(state), state, "Still answering: press Stop first.")
        begun = any(m.get("role") != "assistant" for m in chat_messages(state))
        fresh = new_state() if begun else {**state, "alternatives": {}, "reply_stats": {}}
        greeting = character.opening() if character else ""
        fresh = {**fresh, "character": character.id if character else None,
                 "messages": [{"role": "assistant", "content": greeting}] if greeting else []}
        if character is None:
            return ChatUpdate(fresh["messages"], fresh, "No character: the model answers as itself.")
        where = "A new conversation" if begun else "This conversation"
        return ChatUpdate(fresh["messages"], fresh, f"{where} with **{character.name}**.")

    def stop(self, owner: str) -> str | None:
        return stop_status(self.engine, owner)

    def leave(self, owner: str) -> None:
        """The page of ``owner`` went away (closed, reloaded): its reply stops, and is kept marked interrupted."""
        self._left.add(owner)
        self.engine.stop(owner)

    def preview(
        self, text: str, state: State, params: tuple[Any, ...], stops: str, user: str | None = None,
    ) -> tuple[str, str]:
        """The exact prompt the next Send would use and its token count, without generating."""
        messages = chat_messages(state)
        if (text or "").strip():
            messages.append({"role": "user", "content": text.strip()})
        if not messages:
            return "", "Type a message to see its prompt."
        try:
            request = self._request({**state, "messages": messages}, "preview", params, stops, user=user)
            prepared = self.engine.preview(request)
        except (LoadstarError, ValidationError) as error:
            return "", f"⚠️ {problem_line(error)}"
        notes = "".join(f" ⚠️ {notice}." for notice in prepared.notices)
        why = f" ({prepared.format_why})" if prepared.format_why else ""
        return prepared.prompt, f"{prepared.prompt_tokens} tokens, {prepared.format_name} format{why}.{notes}"

    # -- generation ------------------------------------------------------------------------------

    def _request(
        self, state: State, owner: str, params: tuple[Any, ...], stops: str, continue_last: bool = False,
        tools: ToolChoice = "off", user: str | None = None,
    ) -> GenerationRequest:
        conversation = Conversation.model_validate(state)
        if not conversation.system.strip() and conversation.character:  # the character is who the model is
            character = self.engine.characters.get(user, conversation.character)
            if character is not None:
                conversation = conversation.model_copy(update={"system": character.system_message()})
        offered = self.engine.tools.specs() if tools != "off" else ()
        # "required" holds only for the reply to the user's message: after a tool's result the
        # model decides, or it would call tools for ever.
        answering_user = bool(conversation.messages) and conversation.messages[-1].role == "user"
        mode: ToolMode = "required" if tools == "required" and answering_user else "auto"
        return GenerationRequest(
            messages=conversation.chat_messages(), params=sampling_from_values(params), owner=owner,
            stop=stops_from_text(stops), continue_last=continue_last,
            tools=ToolUse(tools=offered, mode=mode) if offered else ToolUse(),
        )

    def _versions(self, state: State, index: int) -> Earlier:
        """The versions of reply ``index`` so far (and how each was made), before it is answered anew."""
        messages = state.get("messages") or []
        texts = list((state.get("alternatives") or {}).get(index) or [messages[index]["content"]])
        return Earlier(texts, dict((state.get("reply_stats") or {}).get(index) or {}))

    def _reply(
        self, state: State, who: Who, params: tuple[Any, ...], stops: str, continue_last: bool = False,
        earlier: Earlier | None = None, tools: ToolChoice = "off", rounds: int = 0,
    ) -> Iterator[ChatUpdate]:
        """Stream a reply to ``state``'s messages. ``earlier``: the versions of the reply being
        replaced (Regenerate, an edited question), kept with the new one as versions of one message."""
        messages = chat_messages(state)
        if self.engine.has_work(who.owner):
            shown = messages[:-1] if messages and messages[-1]["role"] == "user" and not continue_last else messages
            yield ChatUpdate(shown, state, "Still answering: press Stop first.")
            return
        try:
            request = self._request(state, who.owner, params, stops, continue_last, tools, user=who.user)
            handle = self.engine.submit(request)
        except (LoadstarError, ValidationError) as error:
            yield ChatUpdate(messages, state, f"⚠️ {problem_line(error)}")
            return
        state = self._save(state, who)  # the user's message is safe before the reply starts

        prefix = messages.pop()["content"] if continue_last else ""
        at = len(messages)  # the reply's index
        reply, status, prompt, format_note, model = "", "Queued…", None, "", ""
        finished: Finished | None = None
        try:
            # Until the first text, no empty reply bubble: the chat shows that it waits.
            yield ChatUpdate([*messages, {"role": "assistant", "content": prefix}] if prefix else messages, state, status,
                             running=True)
            for redraw in redraws(handle, update_interval(self.engine.loaded)):
                event, reply = redraw.event, redraw.text
                if isinstance(event, Queued):
                    status = f"Waiting in the queue: position {event.position}."
                elif isinstance(event, Started):
                    format_note = f" Prompt format: {event.format_why}." if event.format_why else ""
                    status = f"Generating with {event.model}…" + _notices(event.notices) + format_note
                    prompt, model = event.prompt, event.model
                elif isinstance(event, Finished):
                    finished = event
                    status = finished_status(event) + format_note
                shown = [*messages, {"role": "assistant", "content": prefix + reply}] if prefix + reply else messages
                if isinstance(event, Finished) and event.tool_calls:
                    shown = [*messages, {"role": "assistant", "content": event.text.strip(),
                                         "tool_calls": [_call_dict(c) for c in event.tool_calls]}]
                    status = _asking(event, state)
                    state = self._save({**state, "messages": shown}, who)
                elif isinstance(event, Finished):
                    made = reply_stats(event, model)
                    if event.reason == "cancelled" and who.owner in self._left:  # stopped as its page went
                        made = made.model_copy(update={"end": "interrupted"})
                    state = self._with_reply(state, shown, at, earlier, made)
                    state = self._save(state, who)
                    if earlier and len(shown) > at:
                        status = f"{status} {_reply_position(state, at)}".rstrip()
                yield ChatUpdate(shown, state, status, prompt, running=not isinstance(event, Finished))
        finally:
            handle.cancel()  # the page went away or Gradio closed us: stop generating for nobody
            if finished is None and prefix + reply:  # keep what was said before the page went away, marked
                shown = [*messages, {"role": "assistant", "content": prefix + reply}]
                self._save(self._with_reply(state, shown, at, earlier, ReplyStats(end="interrupted", model=model)), who)
        calls = pending_calls(state) if finished is not None and finished.tool_calls else []
        allowed = set(state.get("allowed_tools") or [])
        if calls and all(c["name"] in allowed for c in calls):
            if rounds >= MAX_TOOL_ROUNDS:
                yield ChatUpdate(chat_messages(state), state,
                                 f"The model called tools {rounds} times in a row: approve or reject this call.")
                return
            yield from self._run_allowed(state, who, params, stops, calls, rounds + 1)

    @staticmethod
    def _with_reply(
        state: State, shown: list[dict[str, Any]], at: int, earlier: Earlier | None, stats: ReplyStats,
    ) -> State:
        """``state`` with its messages ``shown``: reply ``at`` (when there is one) gets ``stats``, and
        the conversation keeps the ``earlier`` versions beside it (the new one is added when saved)."""
        state = {**state, "messages": shown}
        if len(shown) <= at:
            return state
        by_version = dict(earlier.stats) if earlier else dict((state.get("reply_stats") or {}).get(at) or {})
        by_version[version_key(shown[at]["content"])] = stats.model_dump()
        state["reply_stats"] = {**(state.get("reply_stats") or {}), at: by_version}
        if earlier:
            state["alternatives"] = {**(state.get("alternatives") or {}), at: earlier.texts}
        return state

    def _run_allowed(
        self, state: State, who: Who, params: tuple[Any, ...], stops: str, calls: list[dict[str, Any]], rounds: int,
    ) -> Iterator[ChatUpdate]:
        """Run calls of tools the user allowed always, then let the model go on."""
        messages = chat_messages(state)
        yield ChatUpdate(messages, state, "Running " + ", ".join(c["name"] for c in calls) + " (allowed always)…")
        self._answer_calls(messages, calls, run=True)
        state = self._save({**state, "messages": messages}, who)
        yield from self._reply(state, who, params, stops, tools="auto", rounds=rounds)

    def _answer_calls(self, messages: list[dict[str, Any]], calls: list[dict[str, Any]], run: bool) -> list[str]:
        """Append a tool message per call to ``messages``: its result (``run``) or that the user
        declined it. Returns the one-line failures, for the status."""
        failures = []
        for call in calls:
            if run:
                result = self.engine.tools.run(call["name"], call.get("arguments") or "{}")
                text = result.text
                if not result.ok:
                    failures.append(text)
            else:
                text = DECLINED
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": text})
        return failures

    def _save(self, state: State, who: Who) -> State:
        try:
            saved = self.engine.conversations.save(who.user, Conversation.model_validate(state))
        except (OSError, ValidationError) as error:
            # The chat goes on; the user sees that it is not on disk.
            return {**state, "save_error": problem_line(error)}
        return saved.model_dump()


def model_line(engine: Engine) -> str:
    """The line above the chat: which model answers, through which loader."""
    info = engine.loaded
    if info is None:
        problem = engine.model_problem
        return f"No model is loaded: {problem}." if problem else "No model is loaded: pick one in the **Model** tab."
    others = [m.name for m in engine.resident_models() if m.name != info.name]
    also = f" · also loaded: {', '.join(others)}" if others else ""
    problem = engine.model_problem  # a worker that is not responding
    trouble = f" · ⚠ {problem}" if problem else ""
    context = f" · {info.context_length:,}-token context" if info.context_length else ""
    return f"Model: **{info.name}** · {info.loader} on {info.device}{context}{also}{trouble}"


def _reply_position(state: State, index: int | None = None) -> str:
    conversation = Conversation.model_validate(state)
    position, count = conversation.alternative(len(conversation.messages) - 1 if index is None else index)
    return f"Reply {position + 1}/{count} (‹ and › under it switch)." if count > 1 else ""


def reply_stats(event: Finished, model: str) -> ReplyStats:
    """How a finished reply was made, as its message keeps it."""
    end = "cancelled" if event.reason == "cancelled" else event.reason
    return ReplyStats(first_token_s=event.first_token_seconds, tokens_per_s=round(event.decode_tokens_per_second, 2),
                      tokens=event.completion_tokens, end=end, model=model)


def stop_status(engine: Engine, owner: str) -> str | None:
    """Stop ``owner``'s generations (the chat's and the notebook's alike). None when one was
    stopped: its own last update says "Stopped" within a token, and a "Stopping…" from here could
    reach the page after that update and stay there (the two events race)."""
    return None if engine.stop(owner) else "Nothing is running."


def _text_of(value: Any) -> str:
    """Gradio 6 hands message content back as a list of parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("text") or value.get("content") or "")
    if isinstance(value, list):
        return "".join(_text_of(part) for part in value)
    return "" if value is None else str(value)


def _call_dict(call: Any) -> dict[str, Any]:
    return {"id": call.id, "name": call.name, "arguments": call.arguments}


def _asking(event: Finished, state: State) -> str:
    names = ", ".join(dict.fromkeys(c.name for c in event.tool_calls))
    allowed = set(state.get("allowed_tools") or [])
    if all(c.name in allowed for c in event.tool_calls):
        return f"The model calls {names} (allowed always)."
    return f"The model wants to run **{names}**: approve or reject the call below."


def _notices(notices: tuple[str, ...]) -> str:
    return "".join(f" ⚠️ {notice}." for notice in notices)


def finished_status(event: Finished) -> str:
    if event.reason == "error":
        error = event.error or "generation failed"
        return f"⚠️ {error}" + ("" if error.endswith((".", "!", "?")) else ".")  # what follows is a sentence of its own
    stats = f"{event.completion_tokens} tokens, {event.decode_tokens_per_second:.1f} tokens/s, seed {event.seed}"
    if event.reason == "cancelled":
        text = f"Stopped ({stats})." if event.seed is not None else "Stopped."
    elif event.reason == "length":
        text = f"Reached max new tokens ({stats})."
    else:
        text = f"Done ({stats})."
    return text + _notices(event.notices)
