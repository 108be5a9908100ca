"""The OpenAI response shapes: completion bodies, stream chunks, log probabilities, usage.

``ResponseShape`` is one response's identity (its id, creation time, chat or text flavour, the
model that answered and the name the client asked for); the functions turn the engine's
``Finished`` events, tool calls and log probabilities into OpenAI's JSON.
"""

from __future__ import annotations

import base64
import secrets
import struct
import time
from typing import Any

from loadstar.api.schemas import ChatCompletionRequest, ChatMessageIn, NamedToolChoice
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.tool_calls import ToolCall, ToolUse
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, Started
from loadstar.engine.hub.downloads import progress_dict
from loadstar.engine.hub.jobs import DownloadJob
from loadstar.engine.models.loader_api import TextEmbedding, TokenChoice, TokenLogprob


class ResponseShape:
    """Identity and shapes of one response (ids, timestamps, the chat or text flavour, its choices)."""

    def __init__(
        self, *, chat: bool, model: str, started: Started | None = None, asked: str | None = None, choices: int = 1,
    ) -> None:
        self.chat = chat
        self.started = started
        self.model = model
        self.asked = asked  # the name the client sent, when it is not the loaded model's
        self.choices = choices
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def completion(self, finished: list[Finished]) -> dict[str, Any]:
        choices = []
        for index, done in enumerate(finished):
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": done.text}
                if done.tool_calls:
                    message["content"] = done.text or None
                    message["tool_calls"] = [_call_dict(call) for call in done.tool_calls]
                choice = {"index": index, "message": message, "finish_reason": finish_reason(done),
                          "logprobs": _chat_logprobs(done.logprobs)}
            else:
                choice = {"index": index, "text": done.text, "finish_reason": finish_reason(done),
                          "logprobs": _text_logprobs(done.logprobs)}
            choices.append(choice)
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": choices, "usage": _usage(finished), "loadstar": self.extra(finished)}

    def extra(self, finished: list[Finished]) -> dict[str, Any]:
        """What Loadstar adds to a response (clients ignore unknown fields): the prompt format and how
        it was found, and the notices the UI shows (ignored parameters, why a reply is empty, ...)."""
        started = self.started
        notices = list(dict.fromkeys(notice for done in finished for notice in done.notices))
        return {
            "prompt_format": started.format_name if started else None,
            "prompt_format_source": started.format_why if started else None,
            "notices": [*self.substitution(), *notices],
        }

    def substitution(self) -> list[str]:
        return [f"model '{self.asked}' is not loaded: {self.model} answered"] if self.asked else []

    def chunk(
        self, index: int, text: str | None, finish_reason: str | None, *, role: bool = False,
        logprobs: tuple[TokenLogprob, ...] = (), calls: tuple[ToolCall, ...] = (),
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": i, **_call_dict(call)} for i, call in enumerate(calls)]
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": _chat_logprobs(logprobs) if logprobs else None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason,
                  "logprobs": _text_logprobs(logprobs) if logprobs else None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, finished: list[Finished]) -> dict[str, Any]:
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(object_), "choices": [], "usage": _usage(finished)}


def embeddings_body(model: str, embeddings: list[TextEmbedding], encoding_format: str) -> dict[str, Any]:
    """OpenAI's embeddings list: each vector as floats, or as base64 of little-endian float32."""
    def encoded(vector: tuple[float, ...]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        return list(vector)

    tokens = sum(e.tokens for e in embeddings)
    return {
        "object": "list", "model": model,
        "data": [{"object": "embedding", "index": i, "embedding": encoded(e.vector)} for i, e in enumerate(embeddings)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def chat_message(message: ChatMessageIn) -> ChatMessage:
    calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or ())
    role = "system" if message.role == "developer" else message.role
    return ChatMessage(role=role, content=message.text(), tool_calls=calls, tool_call_id=message.tool_call_id)


def tool_use(body: ChatCompletionRequest) -> ToolUse:
    tools = tuple(tool.model_dump(exclude_none=True) for tool in body.tools or ())
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return ToolUse(tools, "required", choice.function.name)
    return ToolUse(tools, choice or ("auto" if tools else "none"))


def _call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _choice_dict(choice: TokenChoice) -> dict[str, Any]:
    return {"token": choice.token, "logprob": choice.logprob, "bytes": list(choice.bytes)}


def _chat_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {"content": [{**_choice_dict(t.chosen), "top_logprobs": [_choice_dict(c) for c in t.top]} for t in logprobs],
            "refusal": None}


def _text_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    """The legacy completions shape: parallel lists, the alternatives as token -> logprob."""
    if logprobs is None:
        return None
    offsets, at = [], 0
    for t in logprobs:
        offsets.append(at)
        at += len(t.chosen.token)
    return {
        "tokens": [t.chosen.token for t in logprobs],
        "token_logprobs": [t.chosen.logprob for t in logprobs],
        "top_logprobs": [{c.token: c.logprob for c in t.top} for t in logprobs],
        "text_offset": offsets,
    }


def _usage(finished: list[Finished]) -> dict[str, int]:
    prompt = finished[0].prompt_tokens if finished else 0  # the choices share one prompt
    completion = sum(done.completion_tokens for done in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(finished: Finished) -> str:
    return finished.reason if finished.reason in ("length", "tool_calls") else "stop"


def job_dict(job: DownloadJob) -> dict[str, Any]:
    return {
        "id": job.id, "name": str(job.ref), "state": job.state, "message": job.describe(),
        "progress": progress_dict(job.progress) if job.progress else None,
        "folder": job.result.folder.name if job.result else None,
    }


def loaded_dict(engine: Engine) -> dict[str, Any] | None:
    info = engine.loaded
    if info is None:
        return None
    return {"name": info.name, "loader": info.loader, "device": info.device, "dtype": info.dtype, "details": info.details}
