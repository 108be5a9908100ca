"""The OpenAI-compatible API, admin endpoints, health and metrics, as a FastAPI router.

Generation goes through the same engine queue as the web UI, so API clients and browser users
are served fairly (round-robin by owner: an API key counts as one owner). A client that
disconnects cancels its generation; a request still waiting after ``queue_timeout`` seconds
gets a 503 timeout error.

A request's events come to the event loop (``GenerationHandle.listen``): a streaming client costs
no thread, so sync endpoints (``/health``, ``/metrics``) never wait behind streams. A client that
reads slower than the model writes gets the text that piled up in one chunk.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from loadstar.api.errors import ApiError, error_body
from loadstar.api.metrics_text import render_metrics
from loadstar.api.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    DownloadRequest,
    LoadRequest,
    NamedToolChoice,
    SamplingFields,
)
from loadstar.api.security import ApiKeys
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.tool_calls import CallWatch, ToolCall, ToolUse
from loadstar.engine.errors import BadRequestError, LoadstarError, ModelNotFoundError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import Finished, GenerationEvent, GenerationRequest, Queued, Started, TextDelta
from loadstar.engine.generation.service import GenerationHandle
from loadstar.engine.hub.downloads import progress_dict
from loadstar.engine.hub.jobs import DownloadJob
from loadstar.engine.models.loader_api import FEATURE_LOGPROBS, OutputSpec, TokenChoice, TokenLogprob
from loadstar.engine.sampling import SEED_MAX, SamplingParams

POLL_SECONDS = 0.25  # how often a waiting request looks whether its client went away


def build_router(
    engine: Engine, keys: ApiKeys, *, queue_timeout: float, max_tokens_cap: int, load_on_request: bool = False
) -> APIRouter:
    router = APIRouter()
    user = Depends(keys.require_user)
    admin = Depends(keys.require_admin)

    @router.get("/v1/models", dependencies=[user])
    def list_models() -> dict[str, Any]:
        """Every local model, with the loader that would load it and whether it is loaded (``loaded``:
        resident in a worker, up to --max-models; ``current``: the one requests naming no loaded model
        get). Loaded models first, the current one first of all. Inspections are cached by folder
        contents: no weights are read."""
        resident = {info.name: info for info in engine.resident_models()}
        current = engine.loaded
        data = []
        for name in engine.list_models():
            info = resident.get(name)
            if info is None:
                try:
                    best = next((c.loader for c in engine.candidates(name) if c.usable), None)
                except LoadstarError:
                    best = None
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "loadstar",
                         "loader": info.loader if info else best, "loaded": info is not None,
                         "current": bool(current and current.name == name)})
        data.sort(key=lambda row: (not row["current"], not row["loaded"]))
        return {"object": "list", "data": data}

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str = user) -> Any:
        try:
            messages = tuple(_message(m) for m in body.messages)
            tools = _tool_use(body)
            output = OutputSpec(json_schema=body.json_schema(), logprobs=body.top_logprobs_wanted())
        except (BadRequestError, ValidationError, ValueError) as error:
            raise ApiError(400, problem_line(error), "invalid_request_error") from None
        return await _generate(request, body, owner, chat=True, messages=messages, tools=tools, output=output)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, owner: str = user) -> Any:
        output = OutputSpec(logprobs=body.logprobs)
        return await _generate(request, body, owner, chat=False, prompt=body.prompt_text(), output=output)

    @router.get("/metrics", dependencies=[user], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        text = render_metrics(engine.metrics(), engine.waiting, engine.loaded)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @router.get("/admin/models", dependencies=[admin])
    def admin_models() -> dict[str, Any]:
        resident = {info.name for info in engine.resident_models()}
        rows = []
        for name in engine.list_models():
            try:
                summary = engine.inspect(name).summary()
            except LoadstarError as error:
                summary = str(error)
            rows.append({"name": name, "summary": summary, "loaded": name in resident})
        return {"models": rows, "loaded": _loaded_dict(engine)}

    @router.post("/admin/models/load", dependencies=[admin])
    async def admin_load(body: LoadRequest) -> dict[str, Any]:
        try:
            await anyio.to_thread.run_sync(engine.load_model, body.model, body.loader, body.options)
        except ModelNotFoundError as error:
            raise ApiError(404, str(error), "not_found_error", code="model_not_found") from None
        except LoadstarError as error:
            raise ApiError(400, str(error), "invalid_request_error", code="load_failed") from None
        return {"loaded": _loaded_dict(engine)}

    @router.post("/admin/models/unload", dependencies=[admin])
    async def admin_unload() -> dict[str, Any]:
        unloaded = await anyio.to_thread.run_sync(engine.unload_model)
        return {"unloaded": unloaded}

    @router.post("/admin/downloads", dependencies=[admin])
    def admin_download(body: DownloadRequest) -> dict[str, Any]:
        try:
            job = engine.start_download(body.name, body.token, body.gguf_file)
        except LoadstarError as error:
            raise ApiError(400, str(error), "invalid_request_error", param="name") from None
        return _job_dict(job)

    @router.get("/admin/downloads/{job_id}", dependencies=[admin])
    def admin_download_progress(job_id: int) -> dict[str, Any]:
        job = engine.download_job(job_id)
        if job is None:
            raise ApiError(404, f"no download {job_id}", "not_found_error")
        return _job_dict(job)

    async def _load_named(name: str) -> None:
        """With --load-on-request: load the local model a request names, if it is not loaded (the least
        recently used one may go, past --max-models)."""
        if engine.models_resident(name) or name not in engine.list_models():
            return
        try:
            await anyio.to_thread.run_sync(engine.ensure_loaded, name)
        except LoadstarError as error:
            raise ApiError(400, f"could not load '{name}': {error}", "invalid_request_error", code="load_failed") from None

    async def _generate(
        request: Request, body: SamplingFields, owner: str, *, chat: bool, messages: tuple[ChatMessage, ...] = (),
        prompt: str | None = None, tools: ToolUse = ToolUse(), output: OutputSpec = OutputSpec(),
    ) -> Any:
        if load_on_request:
            await _load_named(body.model)
        # A request naming a loaded model goes to it; any other name to the current model.
        target = body.model if engine.models_resident(body.model) else None
        loaded = next((m for m in engine.resident_models() if m.name == target), None) if target else engine.loaded
        if loaded is None:
            raise ApiError(503, "no model is loaded: load one in the UI or with POST /admin/models/load",
                           "server_error", code="model_not_loaded")
        if output.logprobs is not None and FEATURE_LOGPROBS not in loaded.features:
            raise ApiError(400, f"{loaded.loader} does not give log probabilities (logprobs)", "invalid_request_error",
                           param="logprobs")
        # Any name is served by the loaded model (clients often send a fixed one, e.g. "gpt-4"); the
        # response names the model that answered, and a notice says so.
        asked = body.model if body.model != loaded.name else None
        requested = body.max_completion_tokens or body.max_tokens or max_tokens_cap
        handles: list[GenerationHandle] = []
        try:
            optional = {name: getattr(body, name) for name in (
                "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty",
            ) if getattr(body, name) is not None}
            params = SamplingParams.model_validate({
                "temperature": 1.0 if body.temperature is None else body.temperature,
                "top_p": 1.0 if body.top_p is None else body.top_p,
                "top_k": 0,
                "max_new_tokens": min(requested, max_tokens_cap),
                "seed": -1 if body.seed is None else body.seed,
                **optional,
            })
            for index in range(body.n):  # n choices are n requests, decoded together by a batching model
                seed = -1 if body.seed is None else (body.seed + index) % (SEED_MAX + 1)
                handles.append(engine.submit(GenerationRequest(
                    messages=messages, prompt=prompt, params=params.model_copy(update={"seed": seed}), owner=owner,
                    stop=body.stop_strings(), output=output, tools=tools, model=target,
                )))
        except (BadRequestError, ValidationError) as error:
            for handle in handles:
                handle.cancel()
            raise ApiError(400, problem_line(error), "invalid_request_error") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
        for index, handle in enumerate(handles):
            handle.listen(loop, events, index)
        try:
            started, early = await _wait_until_started(events, request, queue_timeout)
        except BaseException:
            _cancel(handles)
            raise
        refused = next((f for f in early.values() if f.reason == "error"), None)
        if refused is not None:  # before any text: an HTTP error, not a stream that ends in one
            _cancel(handles)
            _raise_for(refused)
        ids = Ids(chat=chat, model=loaded.name, started=started, asked=asked, choices=len(handles))
        if body.stream:
            return StreamingResponse(
                _sse(handles, events, request, ids, early, include_usage=body.include_usage(), hold=tools.active),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            finished = await _wait_finished(handles, events, request, early)
        finally:
            _cancel(handles)
        failed = next((f for f in finished if f.reason == "error"), None)
        if failed is not None:
            _raise_for(failed)
        return ids.completion(finished)

    return router


class Ids:
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
                choice = {"index": index, "message": message, "finish_reason": _finish_reason(done),
                          "logprobs": _chat_logprobs(done.logprobs)}
            else:
                choice = {"index": index, "text": done.text, "finish_reason": _finish_reason(done),
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


def _message(message: ChatMessageIn) -> ChatMessage:
    calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or ())
    role = "system" if message.role == "developer" else message.role
    return ChatMessage(role=role, content=message.text(), tool_calls=calls, tool_call_id=message.tool_call_id)


def _tool_use(body: ChatCompletionRequest) -> ToolUse:
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


def _finish_reason(finished: Finished) -> str:
    return finished.reason if finished.reason in ("length", "tool_calls") else "stop"


def _raise_for(failed: Finished) -> None:
    if failed.bad_request:
        raise ApiError(400, failed.error or "bad request", "invalid_request_error")
    raise ApiError(500, failed.error or "generation failed", "server_error")


def _cancel(handles: list[GenerationHandle]) -> None:
    for handle in handles:
        handle.cancel()


def _job_dict(job: DownloadJob) -> dict[str, Any]:
    return {
        "id": job.id, "name": str(job.ref), "state": job.state, "message": job.describe(),
        "progress": progress_dict(job.progress) if job.progress else None,
        "folder": job.result.folder.name if job.result else None,
    }


def _loaded_dict(engine: Engine) -> dict[str, Any] | None:
    info = engine.loaded
    if info is None:
        return None
    return {"name": info.name, "loader": info.loader, "device": info.device, "dtype": info.dtype, "details": info.details}


async def _next(events: asyncio.Queue[tuple[int, GenerationEvent]]) -> tuple[int, GenerationEvent] | None:
    """The next (choice, event), or None after ``POLL_SECONDS`` without one (time to look at the client)."""
    if not events.empty():
        return events.get_nowait()  # most tokens under load: no waiting at all
    try:
        async with asyncio.timeout(POLL_SECONDS):  # no task of its own, unlike wait_for
            return await events.get()
    except TimeoutError:
        return None


def _pending_text(
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
        tagged = await _next(events)
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


async def _wait_finished(
    handles: list[GenerationHandle], events: asyncio.Queue[tuple[int, GenerationEvent]], request: Request,
    early: dict[int, Finished],
) -> list[Finished]:
    finished = dict(early)
    while len(finished) < len(handles) and not any(f.reason == "error" for f in finished.values()):
        tagged = await _next(events)
        if tagged is not None and isinstance(tagged[1], Finished):
            finished[tagged[0]] = tagged[1]
        elif tagged is None and await request.is_disconnected():
            _cancel(handles)  # nobody is waiting for the answer any more
    return [finished[i] for i in sorted(finished)]


async def _sse(
    handles: list[GenerationHandle], events: asyncio.Queue[tuple[int, GenerationEvent]], request: Request,
    ids: Ids, early: dict[int, Finished], *, include_usage: bool, hold: bool = False,
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
        out.append(data({**ids.chunk(index, None, _finish_reason(done)), "loadstar": ids.extra([done])}))
        return out

    try:
        for index in range(len(handles)):
            yield data(ids.chunk(index, "" if ids.chat else None, None, role=True))
        for index, done in early.items():
            for line in end(index, done):
                yield line
        carried: tuple[int, GenerationEvent] | None = None  # read while joining deltas, not yet handled
        while len(finished) < len(handles) and not any(f.reason == "error" for f in finished.values()):
            tagged, carried = carried or await _next(events), None
            if tagged is not None and isinstance(tagged[1], TextDelta):
                delta, carried = _pending_text(events, tagged[0], tagged[1])
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
        _cancel(handles)  # a client that went away stops its own generation
