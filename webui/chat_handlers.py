"""Chat tab handlers: plain functions over the engine. No Gradio components are built here.

A browser session holds one open conversation in ``gr.State`` as a dict (``Conversation``'s
fields); the saved copy on disk is written after every turn. The owner of a generation is the
browser session (Gradio's session hash), so Stop cancels only the requester's own generation;
conversations belong to the login name (``local`` without logins).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loadstar.engine.chat.conversations import Conversation, title_from
from loadstar.engine.errors import LoadstarError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, GenerationRequest, Queued, Started
from loadstar.engine.sampling import SamplingParams, parameter_specs
from loadstar.webui.reasoning import reasoning_source
from loadstar.webui.streaming import redraws

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
    chatbot: list[dict[str, str]]
    state: State
    status: str
    prompt: str | None = None  # the prompt sent, for the prompt viewer (None: leave it)
    keep_input: bool = False  # the message was not taken: leave it in the textbox


def sampling_from_values(values: tuple[Any, ...]) -> SamplingParams:
    """Build SamplingParams from the Parameters tab's control values (in ``parameter_specs()`` order)."""
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


EDITED = "edited_user_message"  # in the page's state only: the user message Regenerate answers anew


def chat_messages(state: State) -> list[dict[str, str]]:
    return [dict(m) for m in state.get("messages", [])]


def new_state() -> State:
    return Conversation().model_dump()


class ChatHandlers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- turns -----------------------------------------------------------------------------------

    def send(self, text: str, state: State, who: Who, params: tuple[Any, ...], stops: str) -> Iterator[ChatUpdate]:
        """Append the user's message and stream the reply."""
        text = (text or "").strip()
        if not text:
            yield ChatUpdate(chat_messages(state), state, "Type a message first.")
            return
        if self.engine.has_work(who.owner):  # keep the message out of the chat, not lost
            yield ChatUpdate(chat_messages(state), state, "Still answering: press Stop first.", keep_input=True)
            return
        state = {**{k: v for k, v in state.items() if k != EDITED},
                 "messages": [*chat_messages(state), {"role": "user", "content": text}]}
        if state.get("title", "New chat") == "New chat":
            state["title"] = title_from(text)
        yield from self._reply(state, who, params, stops)

    def regenerate(self, state: State, who: Who, params: tuple[Any, ...], stops: str) -> Iterator[ChatUpdate]:
        """Drop the last reply and generate it again; after a user message was edited, answer that
        message anew (what came after it is replaced)."""
        messages = chat_messages(state)
        edited = state.get(EDITED)
        state = {k: v for k, v in state.items() if k != EDITED}
        previous: list[str] = []  # the versions of the reply being replaced, kept as alternatives
        if isinstance(edited, int) and 0 <= edited < len(messages) and messages[edited]["role"] == "user":
            messages = messages[: edited + 1]
        elif messages and messages[-1]["role"] == "assistant":
            index = len(messages) - 1
            previous = list((state.get("alternatives") or {}).get(index) or [messages[index]["content"]])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            yield ChatUpdate(chat_messages(state), state, "Nothing to regenerate yet.")
            return
        yield from self._reply({**state, "messages": messages}, who, params, stops, earlier_versions=previous)

    def switch_reply(self, state: State, who: Who, step: int) -> ChatUpdate:
        """Show the previous (step -1) or next (+1) version of the last reply; the model sees it next."""
        messages = chat_messages(state)
        if self.engine.has_work(who.owner):
            return ChatUpdate(messages, state, "Still answering: press Stop first.")
        conversation = Conversation.model_validate(state)
        index = len(messages) - 1
        position, count = conversation.alternative(index)
        if count < 2:
            return ChatUpdate(messages, state, "This reply has no other versions: Regenerate makes one.")
        position = min(max(position + step, 0), count - 1)
        messages[index] = {"role": "assistant", "content": conversation.alternatives[index][position]}
        state = self._save({**state, "messages": messages}, who)
        return ChatUpdate(messages, state, _reply_position(state))

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
        if messages[-1]["role"] == "assistant":
            messages.pop()
        if messages and messages[-1]["role"] == "user":
            messages.pop()
        state = self._save({**state, "messages": messages}, who)
        return ChatUpdate(messages, state, "Removed the last exchange.")

    def edit(self, state: State, who: Who, index: int, text: Any) -> ChatUpdate:
        """Replace message ``index`` with ``text`` (the chat keeps everything after it)."""
        messages = chat_messages(state)
        content = reasoning_source(_text_of(text))  # a reasoning block goes back to the model's <think>
        if not isinstance(index, int) or not 0 <= index < len(messages):
            return ChatUpdate(messages, state, "That message no longer exists.")
        if not content.strip():
            return ChatUpdate(messages, state, "A message cannot be empty: use Remove last instead.")
        role = messages[index]["role"]
        messages[index] = {"role": role, "content": content}
        state = self._save({**state, "messages": messages}, who)
        if role != "user":
            return ChatUpdate(messages, state, "Message edited.")
        later = len(messages) - index - 1
        replaced = f" (the {later} message{'s' if later != 1 else ''} after it will be replaced)" if later else ""
        return ChatUpdate(messages, {**state, EDITED: index},
                          f"Message edited. Press **Regenerate** for a new reply to it{replaced}.")

    def stop(self, owner: str) -> str | None:
        return stop_status(self.engine, owner)

    def preview(self, text: str, state: State, params: tuple[Any, ...], stops: str) -> tuple[str, str]:
        """The exact prompt the next Send would use and its token count, without generating."""
        messages = chat_messages(state)
        if (text or "").strip():
            messages.append({"role": "user", "content": text.strip()})
        if not messages:
            return "", "Type a message to see its prompt."
        try:
            request = self._request({**state, "messages": messages}, "preview", params, stops)
            prepared = self.engine.preview(request)
        except (LoadstarError, ValidationError) as error:
            return "", f"⚠️ {problem_line(error)}"
        notes = "".join(f" ⚠️ {notice}." for notice in prepared.notices)
        why = f" ({prepared.format_why})" if prepared.format_why else ""
        return prepared.prompt, f"{prepared.prompt_tokens} tokens, {prepared.format_name} format{why}.{notes}"

    # -- generation ------------------------------------------------------------------------------

    def _request(
        self, state: State, owner: str, params: tuple[Any, ...], stops: str, continue_last: bool = False
    ) -> GenerationRequest:
        conversation = Conversation.model_validate(state)
        return GenerationRequest(
            messages=conversation.chat_messages(), params=sampling_from_values(params), owner=owner,
            stop=stops_from_text(stops), continue_last=continue_last,
        )

    def _reply(
        self, state: State, who: Who, params: tuple[Any, ...], stops: str, continue_last: bool = False,
        earlier_versions: list[str] | None = None,
    ) -> Iterator[ChatUpdate]:
        """Stream a reply to ``state``'s messages. ``earlier_versions``: the replies a Regenerate
        replaces, kept with the new one as alternatives of the same message."""
        messages = chat_messages(state)
        if self.engine.has_work(who.owner):
            shown = messages[:-1] if messages and messages[-1]["role"] == "user" and not continue_last else messages
            yield ChatUpdate(shown, state, "Still answering: press Stop first.")
            return
        try:
            request = self._request(state, who.owner, params, stops, continue_last)
            handle = self.engine.submit(request)
        except (LoadstarError, ValidationError) as error:
            yield ChatUpdate(messages, state, f"⚠️ {problem_line(error)}")
            return
        state = self._save(state, who)  # the user's message is safe before the reply starts

        prefix = messages.pop()["content"] if continue_last else ""
        reply, status, prompt, format_note = "", "Queued…", None, ""
        finished: Finished | None = None
        try:
            yield ChatUpdate([*messages, {"role": "assistant", "content": prefix}], state, status)
            for redraw in redraws(handle):
                event, reply = redraw.event, redraw.text
                if isinstance(event, Queued):
                    status = f"Waiting in the queue: position {event.position}."
                elif isinstance(event, Started):
                    format_note = f" Prompt format: {event.format_why}." if event.format_why else ""
                    status = f"Generating with {event.model}…" + _notices(event.notices) + format_note
                    prompt = event.prompt
                elif isinstance(event, Finished):
                    finished = event
                    status = finished_status(event) + format_note
                shown = [*messages, {"role": "assistant", "content": prefix + reply}]
                if isinstance(event, Finished):
                    shown = shown if prefix + reply else messages
                    state = {**state, "messages": shown}
                    keep = bool(earlier_versions) and len(shown) > len(messages)
                    if keep:  # the conversation adds the new reply to its versions (once) when it is saved
                        state["alternatives"] = {**(state.get("alternatives") or {}), len(messages): earlier_versions}
                    state = self._save(state, who)
                    if keep:
                        status = f"{status} {_reply_position(state)}"
                yield ChatUpdate(shown, state, status, prompt)
        finally:
            handle.cancel()  # the page went away or Gradio closed us: stop generating for nobody
            if finished is None and prefix + reply:  # keep what was said before the page went away
                self._save({**state, "messages": [*messages, {"role": "assistant", "content": prefix + reply}]}, who)

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
    return f"Model: **{info.name}** · {info.loader} on {info.device}{also}"


def _reply_position(state: State) -> str:
    conversation = Conversation.model_validate(state)
    position, count = conversation.alternative(len(conversation.messages) - 1)
    return f"Reply {position + 1}/{count} (‹ and › switch)." if count > 1 else ""


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


def _notices(notices: tuple[str, ...]) -> str:
    return "".join(f" ⚠️ {notice}." for notice in notices)


def finished_status(event: Finished) -> str:
    if event.reason == "error":
        return f"⚠️ {event.error}"
    stats = f"{event.completion_tokens} tokens, {event.tokens_per_second:.1f} tokens/s, seed {event.seed}"
    if event.reason == "cancelled":
        text = f"Stopped ({stats})." if event.seed is not None else "Stopped."
    elif event.reason == "length":
        text = f"Reached max new tokens ({stats})."
    else:
        text = f"Done ({stats})."
    return text + _notices(event.notices)
