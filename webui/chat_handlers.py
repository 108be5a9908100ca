"""Chat tab handlers: plain functions over the engine. No Gradio components are built here.

History is a list of ``{"role", "content"}`` dicts kept per browser session in ``gr.State``.
The owner of a generation is the browser session (Gradio's session hash), so Stop cancels
only the requester's own generation.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from pydantic import ValidationError

from engine.chat import ChatMessage
from engine.engine import Engine
from engine.errors import LoadstarError
from engine.generation import Finished, GenerationRequest, Queued, Started, TextDelta
from engine.sampling import SamplingParams, parameter_specs

History = list[dict[str, str]]
UPDATE_INTERVAL = 0.08  # seconds between streamed chat updates
# What every streaming handler yields: (chatbot messages, history state, status line)
ChatUpdate = tuple[History, History, str]


def sampling_from_values(values: tuple[Any, ...]) -> SamplingParams:
    """Build SamplingParams from the Parameters tab's control values (in ``parameter_specs()`` order)."""
    names = [spec.name for spec in parameter_specs()]
    raw = dict(zip(names, values))
    if raw.get("seed") is not None:
        raw["seed"] = int(raw["seed"])
    return SamplingParams.model_validate(raw)


class ChatHandlers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def send(self, text: str, history: History, owner: str, *param_values: Any) -> Iterator[tuple[str, History, History, str]]:
        """Append the user's message and stream the reply. Yields (textbox, chatbot, history, status)."""
        text = (text or "").strip()
        if not text:
            yield "", history, history, "Type a message first."
            return
        history = [*history, {"role": "user", "content": text}]
        for chat, state, status in self._reply(history, owner, param_values):
            yield "", chat, state, status

    def regenerate(self, history: History, owner: str, *param_values: Any) -> Iterator[ChatUpdate]:
        """Drop the last reply and generate it again."""
        trimmed = list(history)
        while trimmed and trimmed[-1]["role"] == "assistant":
            trimmed.pop()
        if not trimmed:
            yield history, history, "Nothing to regenerate yet."
            return
        yield from self._reply(trimmed, owner, param_values)

    def stop(self, owner: str) -> str:
        stopped = self.engine.stop(owner)
        return "Stopping…" if stopped else "Nothing is running."

    def clear(self, owner: str) -> ChatUpdate:
        self.engine.stop(owner)
        return [], [], ""

    def _reply(self, history: History, owner: str, param_values: tuple[Any, ...]) -> Iterator[ChatUpdate]:
        if self.engine.generation.has_work(owner):
            yield history[:-1] if history[-1]["role"] == "user" else history, history, "Still answering: press Stop first."
            return
        try:
            params = sampling_from_values(param_values)
            messages = tuple(ChatMessage(role=m["role"], content=m["content"]) for m in history)
            handle = self.engine.submit(GenerationRequest(messages=messages, params=params, owner=owner))
        except ValidationError as error:
            problem = error.errors()[0]
            field = ".".join(str(p) for p in problem["loc"])
            yield history, history, f"⚠️ {field}: {problem['msg']}"
            return
        except LoadstarError as error:
            yield history, history, f"⚠️ {error}"
            return

        reply = ""
        status = "Queued…"
        yield [*history, {"role": "assistant", "content": ""}], history, status
        last_yield = 0.0
        try:
            for event in handle.events():
                if isinstance(event, Queued):
                    status = f"Waiting in the queue: position {event.position}."
                elif isinstance(event, Started):
                    status = f"Generating with {event.model}…"
                elif isinstance(event, TextDelta):
                    reply += event.text
                    # Every update re-renders the whole chat in the browser: at most ~12 a second
                    # keeps the page smooth and leaves the CPU to the model (measured in bench/).
                    if time.monotonic() - last_yield < UPDATE_INTERVAL and last_yield:
                        continue
                elif isinstance(event, Finished):
                    status = finished_status(event)
                    reply = event.text or reply
                final = [*history, {"role": "assistant", "content": reply}] if reply or not isinstance(event, Finished) else history
                last_yield = time.monotonic()
                yield final, final, status
        finally:
            handle.cancel()  # the page went away or Gradio closed us: stop generating for nobody


def finished_status(event: Finished) -> str:
    if event.reason == "error":
        return f"⚠️ {event.error}"
    stats = f"{event.completion_tokens} tokens, {event.tokens_per_second:.1f} tokens/s, seed {event.seed}"
    if event.reason == "cancelled":
        return f"Stopped ({stats})." if event.seed is not None else "Stopped."
    if event.reason == "length":
        return f"Reached max new tokens ({stats})."
    return f"Done ({stats})."
