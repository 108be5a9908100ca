"""Anthropic's Messages API (``POST /v1/messages``) on the same engine, queue and models as the rest.

The request (a system prompt, messages of content blocks: text, ``tool_use``, ``tool_result``;
tools with an ``input_schema``) is mapped to the engine's chat messages and ``ToolUse``, and the
answer comes back as Anthropic's message: content blocks (text, ``tool_use``), ``stop_reason``
(``end_turn``, ``max_tokens``, ``stop_sequence``, ``tool_use``) and usage; streamed as its events
(``message_start``, ``content_block_start``/``_delta``/``_stop``, ``message_delta``,
``message_stop``). Clients send their key as ``x-api-key`` or as a Bearer token (api/security.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loadstar.api.errors import ApiError
from loadstar.api.schemas import MAX_STOP_LENGTH, MAX_STOP_STRINGS, SamplingFields
from loadstar.api.security import ApiKeys
from loadstar.api.serving import (
    STREAM_HEADERS,
    ServingLimits,
    cancel_all,
    next_event,
    open_request,
    pending_text,
    raise_for,
    wait_finished,
)
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.tool_calls import CallWatch, ToolCall, ToolMode, ToolUse
from loadstar.engine.errors import BadRequestError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.generation.handle import GenerationHandle
from loadstar.engine.generation.requests import Finished, GenerationEvent, TextDelta


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        body = self.content if isinstance(self.content, str) else "".join(block.text for block in self.content)
        return f"Error: {body}" if self.is_error else body


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolChoiceIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class MessagesRequest(SamplingFields):
    """Anthropic's request; the sampling fields it shares with OpenAI's come from SamplingFields."""

    max_tokens: int = Field(ge=1, le=32768, description="Most new tokens (required, as in Anthropic's API).")
    messages: list[MessageIn] = Field(min_length=1, max_length=10_000)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    tools: list[ToolIn] | None = Field(None, max_length=128)
    tool_choice: ToolChoiceIn | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one_reply(cls, n: int) -> int:
        # SamplingFields is shared with OpenAI's API, whose n decodes choices together; a message
        # has one reply, and n=3 once mixed three into one stream.
        if n != 1:
            raise ValueError("the Messages API has no n (one reply per request): send one request per reply")
        return n

    def stop_strings(self) -> tuple[str, ...]:
        stops = tuple(self.stop_sequences or ())
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise BadRequestError(f"each stop sequence must be 1 to {MAX_STOP_LENGTH} characters")
        return stops

    def chat(self) -> tuple[ChatMessage, ...]:
        """The conversation as the engine's chat messages (tool uses and results included)."""
        out: list[ChatMessage] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(block.text for block in self.system)
            out.append(ChatMessage(role="system", content=system))
        for message in self.messages:
            if isinstance(message.content, str):
                out.append(ChatMessage(role=message.role, content=message.content))
                continue
            texts = [block.text for block in message.content if isinstance(block, TextBlock)]
            calls = tuple(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False))
                          for block in message.content if isinstance(block, ToolUseBlock))
            for block in message.content:
                if isinstance(block, ToolResultBlock):
                    out.append(ChatMessage(role="tool", content=block.text(), tool_call_id=block.tool_use_id))
            if texts or calls or not any(isinstance(b, ToolResultBlock) for b in message.content):
                out.append(ChatMessage(role=message.role, content="".join(texts), tool_calls=calls))
        return tuple(out)

    def tool_use(self) -> ToolUse:
        tools = tuple({"type": "function", "function": {"name": t.name, "description": t.description,
                                                        "parameters": t.input_schema}} for t in self.tools or ())
        choice = self.tool_choice
        if choice is None or not tools:
            return ToolUse(tools, "auto" if tools else "none")
        if choice.type == "tool":
            if not choice.name:
                raise BadRequestError("tool_choice of type 'tool' needs a name")
            return ToolUse(tools, "required", choice.name)
        modes: dict[str, ToolMode] = {"auto": "auto", "any": "required", "none": "none"}
        return ToolUse(tools, modes[choice.type])


def build_messages_router(engine: Engine, keys: ApiKeys, limits: ServingLimits) -> APIRouter:
    router = APIRouter()
    user = Depends(keys.require_user)

    @router.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request, owner: str = user) -> Any:
        try:
            chat, tools = body.chat(), body.tool_use()
        except (BadRequestError, ValidationError, ValueError) as error:
            raise ApiError(400, problem_line(error), "invalid_request_error") from None
        opened = await open_request(engine, limits, request, body, owner, messages=chat, tools=tools)
        shape = MessageShape(opened.model, opened.started.prompt_tokens if opened.started else 0)
        if body.stream:
            return StreamingResponse(_events(opened.handles, opened.events, request, shape, opened.early,
                                             hold=tools.active),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            finished = await wait_finished(opened.handles, opened.events, request, opened.early)
        finally:
            cancel_all(opened.handles)
        if finished[0].reason == "error":
            raise_for(finished[0])
        return shape.message(finished[0])

    return router


class MessageShape:
    """One answer's identity and Anthropic's shapes of it."""

    def __init__(self, model: str, input_tokens: int) -> None:
        self.id = "msg_" + secrets.token_hex(12)
        self.model = model
        self.input_tokens = input_tokens

    def head(self, output_tokens: int = 0) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens}}

    def message(self, done: Finished) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": done.text}] if done.text or not done.tool_calls else []
        content += [tool_use_block(call) for call in done.tool_calls]
        return {**self.head(done.completion_tokens), "content": content, **stop_of(done)}


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name,
            "input": arguments if isinstance(arguments, dict) else {}}


def stop_of(done: Finished) -> dict[str, Any]:
    """Anthropic's stop_reason and stop_sequence for how a reply ended."""
    if done.reason == "tool_calls":
        return {"stop_reason": "tool_use", "stop_sequence": None}
    if done.reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    if done.stop_string is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": done.stop_string}
    return {"stop_reason": "end_turn", "stop_sequence": None}


async def _events(
    handles: list[GenerationHandle], events: asyncio.Queue[tuple[int, GenerationEvent]], request: Request,
    shape: MessageShape, early: dict[int, Finished], *, hold: bool,
) -> AsyncIterator[str]:
    """Anthropic's stream for the one choice: text blocks as they come (held back where it may be a tool
    call, as for OpenAI's stream), then the tool_use blocks, then the stop reason and usage."""
    def event(kind: str, payload: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"

    watch = CallWatch() if hold else None
    opened_text = False

    def text(piece: str) -> list[str]:
        nonlocal opened_text
        out = []
        if not opened_text:
            opened_text = True
            out.append(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
        out.append(event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}}))
        return out

    try:
        yield event("message_start", {"message": shape.head()})
        done: Finished | None = early.get(0)
        while done is None:
            tagged = await next_event(events)
            if tagged is not None and isinstance(tagged[1], TextDelta):
                delta, carried = pending_text(events, tagged[0], tagged[1])
                shown = watch.add(delta.text) if watch is not None else delta.text
                for line in text(shown) if shown else []:
                    yield line
                if carried is not None and isinstance(carried[1], Finished):
                    done = carried[1]
                continue
            if tagged is not None and isinstance(tagged[1], Finished):
                done = tagged[1]
            elif tagged is None and await request.is_disconnected():
                return
        if done.reason == "error":
            yield event("error", {"error": {"type": "api_error", "message": done.error or "generation failed"}})
            return
        rest = watch.rest(done.text) if watch is not None else ""
        for line in text(rest) if rest else []:
            yield line
        index = 0
        if opened_text:
            yield event("content_block_stop", {"index": 0})
            index = 1
        for call in done.tool_calls:
            block = tool_use_block(call)
            yield event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
            yield event("content_block_delta", {"index": index, "delta": {"type": "input_json_delta",
                                                                          "partial_json": json.dumps(block["input"])}})
            yield event("content_block_stop", {"index": index})
            index += 1
        yield event("message_delta", {"delta": stop_of(done), "usage": {"output_tokens": done.completion_tokens}})
        yield event("message_stop", {})
    finally:
        cancel_all(handles)
