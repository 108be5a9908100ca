"""Serving a generation request over HTTP: submit it, wait through the queue, answer or stream.

A request's events come to the event loop (``GenerationHandle.listen``): a streaming client costs
no thread, so sync endpoints (``/health``, ``/metrics``) never wait behind streams. A client that
reads slower than the model writes gets the text that piled up in one chunk. A client that
disconnects cancels its generation; a request still waiting after the queue timeout gets a 503.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from loadstar.api.errors import ApiError, error_body
from loadstar.api.responses import ResponseShape, finish_reason
from loadstar.api.schemas import SamplingFields
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.tool_calls import CallWatch, ToolUse
from loadstar.engine.errors import BadRequestError, LoadstarError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, GenerationEvent, GenerationRequest, Queued, Started, TextDelta
from loadstar.engine.generation.service import GenerationHandle
from loadstar.engine.models.loader_api import FEATURE_LOGPROBS, OutputSpec

POLL_SECONDS = 0.25  # how often a waiting request looks whether its client went away
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServingLimits:
    """The server's settings for API generation (from Settings, through build_router)."""

    queue_timeout: float
    max_tokens_cap: int
    load_on_request: bool = False


async def load_named(engine: Engine, name: str) -> None:
    """With --load-on-request: load the local model a request names, if it is not loaded (the least
    recently used one may go, past --max-models)."""
    if engine.models_resident(name) or name not in engine.list_models():
        return
    try:
        await anyio.to_thread.run_sync(engine.ensure_loaded, name)
    except LoadstarError as error:
        raise ApiError(400, f"could not load '{name}': {error}", "invalid_request_error", code="load_failed") from None


@dataclass
class Opened:
    """A submitted request that has started (or was refused before any text): what answering it needs."""

    handles: list[GenerationHandle]
    events: asyncio.Queue[tuple[int, GenerationEvent]]
    started: Started | None
    early: dict[int, Finished]  # the choices that ended before the first started
    model: str  # the model that answers
    asked: str | None  # the name the client sent, when another model answers


async def open_request(
    engine: Engine, limits: ServingLimits, request: Request, body: SamplingFields, owner: str, *,
    messages: tuple[ChatMessage, ...] = (), prompt: str | None = None, tools: ToolUse = ToolUse(),
    output: OutputSpec = OutputSpec(),
) -> Opened:
    """Submit the request (``n`` choices) and wait through the queue until it starts; an ``ApiError``
    for a request refused before any text (an HTTP error, not a stream that ends in one)."""
    if limits.load_on_request:
        await load_named(engine, body.model)
    # A request naming a loaded model goes to it; any other name to the current model.
    target = body.model if engine.models_resident(body.model) else None
    loaded = next((m for m in engine.resident_models() if m.name == target), None) if target else engine.loaded
    if loaded is None:
        raise ApiError(503, "no model is loaded: load one in the UI or with POST /admin/models/load",
                       "server_error", code="model_not_loaded")
    if output.logprobs is not None and FEATURE_LOGPROBS not in loaded.features:
        raise ApiError(400, f"{loaded.loader} does not give log probabilities (logprobs)", "invalid_request_error",
                       param="logprobs")
    handles: list[GenerationHandle] = []
    try:
        params = body.to_sampling_params(limits.max_tokens_cap)
        for seed in body.choice_seeds():  # n choices are n requests, decoded together by a batching model
            handles.append(engine.submit(GenerationRequest(
                messages=messages, prompt=prompt, params=params.model_copy(update={"seed": seed}), owner=owner,
                stop=body.stop_strings(), output=output, tools=tools, model=target,
            )))
    except (BadRequestError, ValidationError) as error:
        cancel_all(handles)
        raise ApiError(400, problem_line(error), "invalid_request_error") from None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
    for index, handle in enumerate(handles):
        handle.listen(loop, events, index)
    try:
        started, early = await _wait_until_started(events, request, limits.queue_timeout)
    except BaseException:
        cancel_all(handles)
        raise
    refused = next((f for f in early.values() if f.reason == "error"), None)
    if refused is not None:
        cancel_all(handles)
        raise_for(refused)
    # Any name is served by a loaded model (clients often send a fixed one, e.g. "gpt-4"); the
    # response names the model that answered, and a notice says so.
    asked = body.model if body.model != loaded.name else None
    return Opened(handles, events, started, early, loaded.name, asked)


async def generate(
    engine: Engine, limits: ServingLimits, request: Request, body: SamplingFields, owner: str, *, chat: bool,
    messages: tuple[ChatMessage, ...] = (), prompt: str | None = None, tools: ToolUse = ToolUse(),
    output: OutputSpec = OutputSpec(),
) -> Any:
    """An OpenAI chat or text completion: submitted, waited for, answered whole or as a stream."""
    opened = await open_request(engine, limits, request, body, owner, messages=messages, prompt=prompt, tools=tools,
                                output=output)
    handles, events, early = opened.handles, opened.events, opened.early
    ids = ResponseShape(chat=chat, model=opened.model, started=opened.started, asked=opened.asked, choices=len(handles))
    if body.stream:
        return StreamingResponse(
            _sse(handles, events, request, ids, early, include_usage=body.include_usage(), hold=tools.active),
            media_type="text/event-stream", headers=STREAM_HEADERS,
        )
    try:
        finished = await wait_finished(handles, events, request, early)
    finally:
        cancel_all(handles)
    failed = next((f for f in finished if f.reason == "error"), None)
    if failed is not None:
        raise_for(failed)
    return ids.completion(finished)


def raise_for(failed: Finished) -> None:
    if failed.bad_request:
        raise ApiError(400, failed.error or "bad request", "invalid_request_error")
    raise ApiError(500, failed.error or "generation failed", "server_error")


def cancel_all(handles: list[GenerationHandle]) -> None:
    for handle in handles:
        handle.cancel()


async def next_event(events: asyncio.Queue[tuple[int, GenerationEvent]]) -> tuple[int, GenerationEvent] | None:
    """The next (choice, event), or None after ``POLL_SECONDS`` without one (time to look at the client)."""
    if not events.empty():
        return events.get_nowait()  # most tokens under load: no waiting at all
    try:
        async with asyncio.timeout(POLL_SECONDS):  # no task of its own, unlike wait_for
            return await events.get()
    except TimeoutError:
        return None


def pending_text(
    events: asyncio.Queue[tuple[int, GenerationEvent]], index: int, delta: TextDelta,
) -> tuple[TextDelta, tuple[int, GenerationEvent] | None]:
    """``delta`` joined with the deltas of the same choice already waiting (a lagging client gets one
    chunk), and the first other event, if one came after them."""
    parts, logprobs = [delta.text], list(delta.logprobs)
    while not events.empty():
        tagged = events.get_nowait()
        event = tagged[1]
        if tagged[0] != index or not isinstance(event, TextDelta):
            return TextDelta("".join(parts), tuple(logprobs)), tagged
        parts.append(event.text)
        logprobs.extend(event.logprobs)
    return TextDelta("".join(parts), tuple(logprobs)), None


async def _wait_until_started(
    events: asyncio.Queue[tuple[int, GenerationEvent]], request: Request, timeout: float
) -> tuple[Started | None, dict[int, Finished]]:
    """Wait through the queue until a choice starts. Returns its Started, and the choices that
    ended first (a request refused before it ran)."""
    deadline = time.monotonic() + timeout
    position = None
    early: dict[int, Finished] = {}
    while True:
        tagged = await next_event(events)
        event = tagged[1] if tagged else None
        if isinstance(event, Started):
            return event, early
        if isinstance(event, Finished) and tagged is not None:
            early[tagged[0]] = event
            if event.reason == "error":
                return None, early
        if isinstance(event, Queued):
            position = event.position if position is None else min(position, event.position)
        if await request.is_disconnected():
            raise ApiError(499, "client went away", "client_closed")
        if time.monotonic() > deadline:
            where = f" (position {position})" if position else ""
            raise ApiError(503, f"timed out after {timeout:.0f} s waiting in the queue{where}; try again later",
                           "timeout_error", code="queue_timeout")


async def wait_finished(
    handles: list[GenerationHandle], events: asyncio.Queue[tuple[int, GenerationEvent]], request: Request,
    early: dict[int, Finished],
) -> list[Finished]:
    finished = dict(early)
    while len(finished) < len(handles) and not any(f.reason == "error" for f in finished.values()):
        tagged = await next_event(events)
        if tagged is not None and isinstance(tagged[1], Finished):
            finished[tagged[0]] = tagged[1]
        elif tagged is None and await request.is_disconnected():
            cancel_all(handles)  # nobody is waiting for the answer any more
    return [finished[i] for i in sorted(finished)]


async def _sse(
    handles: list[GenerationHandle], events: asyncio.Queue[tuple[int, GenerationEvent]], request: Request,
    ids: ResponseShape, early: dict[int, Finished], *, include_usage: bool, hold: bool = False,
) -> AsyncIterator[str]:
    """The chunks of every choice as they come. ``hold``: tools are offered, so text that may be a
    tool call is held back (``CallWatch``) and sent at the choice's end, as text or as tool calls
    (a call is only known to be one when it is whole); other text streams as it comes."""
    def data(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    finished: dict[int, Finished] = {}
    watches = {index: CallWatch() for index in range(len(handles))} if hold else {}

    def end(index: int, done: Finished) -> list[str]:
        finished[index] = done
        if done.reason == "error":
            return [data(error_body(done.error or "generation failed", "server_error"))]
        out = []
        rest = watches[index].rest(done.text) if hold else ""
        if rest or done.tool_calls:
            out.append(data(ids.chunk(index, rest or None, None, calls=done.tool_calls)))
        out.append(data({**ids.chunk(index, None, finish_reason(done)), "loadstar": ids.extra([done])}))
        return out

    try:
        for index in range(len(handles)):
            yield data(ids.chunk(index, "" if ids.chat else None, None, role=True))
        for index, done in early.items():
            for line in end(index, done):
                yield line
        carried: tuple[int, GenerationEvent] | None = None  # read while joining deltas, not yet handled
        while len(finished) < len(handles) and not any(f.reason == "error" for f in finished.values()):
            tagged, carried = carried or await next_event(events), None
            if tagged is not None and isinstance(tagged[1], TextDelta):
                delta, carried = pending_text(events, tagged[0], tagged[1])
                if not hold:
                    yield data(ids.chunk(tagged[0], delta.text, None, logprobs=delta.logprobs))
                elif shown := watches[tagged[0]].add(delta.text):
                    yield data(ids.chunk(tagged[0], shown, None))
                continue
            if tagged is not None and isinstance(tagged[1], Finished):
                for line in end(tagged[0], tagged[1]):
                    yield line
            elif tagged is None and await request.is_disconnected():
                return
        if not any(f.reason == "error" for f in finished.values()) and include_usage:
            yield data(ids.usage_chunk([finished[i] for i in sorted(finished)]))
        yield "data: [DONE]\n\n"
    finally:
        cancel_all(handles)  # a client that went away stops its own generation
