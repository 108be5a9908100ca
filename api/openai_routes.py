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
from typing import Any, AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from api.errors import ApiError, error_body
from api.metrics_text import render_metrics
from api.schemas import ChatCompletionRequest, CompletionRequest, DownloadRequest, LoadRequest, SamplingFields
from api.security import ApiKeys
from engine.chat import ChatMessage
from engine.download_jobs import DownloadJob
from engine.downloads import progress_dict
from engine.engine import Engine
from engine.errors import BadRequestError, LoadstarError, ModelNotFoundError
from engine.generation import Finished, GenerationEvent, GenerationHandle, GenerationRequest, Queued, Started, TextDelta
from engine.sampling import SamplingParams

POLL_SECONDS = 0.25  # how often a waiting request looks whether its client went away


def build_router(engine: Engine, keys: ApiKeys, *, queue_timeout: float, max_tokens_cap: int) -> APIRouter:
    router = APIRouter()
    user = Depends(keys.require_user)
    admin = Depends(keys.require_admin)

    @router.get("/v1/models", dependencies=[user])
    def list_models() -> dict[str, Any]:
        """Every local model, with the loader that would load it and whether it is the loaded one
        (the loaded model first). Inspections are cached by folder contents: no weights are read."""
        loaded = engine.models.loaded
        data = []
        for name in engine.models.list_models():
            try:
                best = next((c.loader for c in engine.models.candidates(name) if c.usable), None)
            except LoadstarError:
                best = None
            is_loaded = bool(loaded and loaded.name == name)
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "loadstar",
                         "loader": loaded.loader if is_loaded and loaded else best, "loaded": is_loaded})
        data.sort(key=lambda row: not row["loaded"])
        return {"object": "list", "data": data}

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str = user) -> Any:
        messages = tuple(
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages
        )
        return await _generate(request, body, owner, chat=True, messages=messages)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, owner: str = user) -> Any:
        return await _generate(request, body, owner, chat=False, prompt=body.prompt_text())

    @router.get("/metrics", dependencies=[user], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        text = render_metrics(engine.generation.metrics.snapshot(), engine.generation.waiting, engine.models.loaded)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @router.get("/admin/models", dependencies=[admin])
    def admin_models() -> dict[str, Any]:
        loaded = engine.models.loaded
        rows = []
        for name in engine.models.list_models():
            try:
                summary = engine.models.inspect(name).summary()
            except LoadstarError as error:
                summary = str(error)
            rows.append({"name": name, "summary": summary, "loaded": bool(loaded and loaded.name == name)})
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
            job = engine.downloads.start(body.name, body.token, body.gguf_file)
        except LoadstarError as error:
            raise ApiError(400, str(error), "invalid_request_error", param="name") from None
        return _job_dict(job)

    @router.get("/admin/downloads/{job_id}", dependencies=[admin])
    def admin_download_progress(job_id: int) -> dict[str, Any]:
        job = engine.downloads.get(job_id)
        if job is None:
            raise ApiError(404, f"no download {job_id}", "not_found_error")
        return _job_dict(job)

    async def _generate(
        request: Request, body: SamplingFields, owner: str, *, chat: bool,
        messages: tuple[ChatMessage, ...] = (), prompt: str | None = None,
    ) -> Any:
        loaded = engine.models.loaded
        if loaded is None:
            raise ApiError(503, "no model is loaded: load one in the UI or with POST /admin/models/load",
                           "server_error", code="model_not_loaded")
        # Any name is served by the loaded model (clients often send a fixed one, e.g. "gpt-4"); the
        # response names the model that answered, and a notice says so.
        asked = body.model if body.model != loaded.name else None
        requested = body.max_completion_tokens or body.max_tokens or max_tokens_cap
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
            handle = engine.submit(GenerationRequest(
                messages=messages, prompt=prompt, params=params, owner=owner, stop=body.stop_strings()
            ))
        except (BadRequestError, ValidationError) as error:
            raise ApiError(400, str(error).splitlines()[0], "invalid_request_error") from None
        events = handle.listen(asyncio.get_running_loop())
        try:
            started, early = await _wait_until_started(events, request, queue_timeout)
        except BaseException:
            handle.cancel()
            raise
        ids = Ids(chat=chat, model=loaded.name, started=started, asked=asked)
        if body.stream:
            return StreamingResponse(
                _sse(handle, events, request, ids, early, include_usage=body.include_usage()),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            finished = early if isinstance(early, Finished) else await _wait_finished(handle, events, request)
        finally:
            handle.cancel()
        if finished.reason == "error":
            raise ApiError(500, finished.error or "generation failed", "server_error")
        return ids.completion(finished)

    return router


class Ids:
    """Identity and shapes of one response (ids, timestamps, the chat or text flavour)."""

    def __init__(self, *, chat: bool, model: str, started: Started | None = None, asked: str | None = None) -> None:
        self.chat = chat
        self.started = started
        self.model = model
        self.asked = asked  # the name the client sent, when it is not the loaded model's
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def completion(self, finished: Finished) -> dict[str, Any]:
        reason = _finish_reason(finished)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": finished.text}, "finish_reason": reason}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": finished.text, "finish_reason": reason, "logprobs": None}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": _usage(finished), "loadstar": self.extra(finished)}

    def extra(self, finished: Finished) -> dict[str, Any]:
        """What Loadstar adds to a response (clients ignore unknown fields): the prompt format and how
        it was found, and the notices the UI shows (ignored parameters, why a reply is empty, ...)."""
        started = self.started
        return {
            "prompt_format": started.format_name if started else None,
            "prompt_format_source": started.format_why if started else None,
            "notices": [*self.substitution(), *finished.notices],
        }

    def substitution(self) -> list[str]:
        return [f"model '{self.asked}' is not loaded: {self.model} answered"] if self.asked else []

    def chunk(self, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        object_ = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(object_), "choices": [], "usage": _usage(finished)}


def _usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _finish_reason(finished: Finished) -> str:
    return "length" if finished.reason == "length" else "stop"


def _job_dict(job: DownloadJob) -> dict[str, Any]:
    return {
        "id": job.id, "name": str(job.ref), "state": job.state, "message": job.describe(),
        "progress": progress_dict(job.progress) if job.progress else None,
        "folder": job.result.folder.name if job.result else None,
    }


def _loaded_dict(engine: Engine) -> dict[str, Any] | None:
    info = engine.models.loaded
    if info is None:
        return None
    return {"name": info.name, "loader": info.loader, "device": info.device, "dtype": info.dtype, "details": info.details}


async def _next(events: "asyncio.Queue[GenerationEvent]") -> GenerationEvent | None:
    """The next event, or None after ``POLL_SECONDS`` without one (time to look at the client)."""
    if not events.empty():
        return events.get_nowait()  # most tokens under load: no waiting at all
    try:
        async with asyncio.timeout(POLL_SECONDS):  # no task of its own, unlike wait_for
            return await events.get()
    except TimeoutError:
        return None


def _pending_text(events: "asyncio.Queue[GenerationEvent]") -> tuple[str, GenerationEvent | None]:
    """The text of the deltas already waiting, joined (a lagging client gets one chunk), and the
    first other event, if one came after them."""
    parts = []
    while not events.empty():
        event = events.get_nowait()
        if not isinstance(event, TextDelta):
            return "".join(parts), event
        parts.append(event.text)
    return "".join(parts), None


async def _wait_until_started(
    events: "asyncio.Queue[GenerationEvent]", request: Request, timeout: float
) -> tuple[Started | None, GenerationEvent | None]:
    """Wait through the queue. Returns (Started, None), or (None, Finished) if it ended first."""
    deadline = time.monotonic() + timeout
    position = None
    while True:
        event = await _next(events)
        if isinstance(event, Started):
            return event, None
        if isinstance(event, Finished):
            return None, event
        if isinstance(event, Queued):
            position = event.position
        if await request.is_disconnected():
            raise ApiError(499, "client went away", "client_closed")
        if time.monotonic() > deadline:
            where = f" (position {position})" if position else ""
            raise ApiError(503, f"timed out after {timeout:.0f} s waiting in the queue{where}; try again later",
                           "timeout_error", code="queue_timeout")


async def _wait_finished(handle: GenerationHandle, events: "asyncio.Queue[GenerationEvent]", request: Request) -> Finished:
    while True:
        event = await _next(events)
        if isinstance(event, Finished):
            return event
        if event is None and await request.is_disconnected():
            handle.cancel()  # nobody is waiting for the answer any more


async def _sse(
    handle: GenerationHandle, events: "asyncio.Queue[GenerationEvent]", request: Request, ids: Ids,
    early: GenerationEvent | None, *, include_usage: bool,
) -> AsyncIterator[str]:
    def data(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        yield data(ids.chunk("" if ids.chat else None, None, role=True))
        finished = early if isinstance(early, Finished) else None
        while finished is None:
            event = await _next(events)
            if isinstance(event, TextDelta):
                more, after = _pending_text(events)
                yield data(ids.chunk(event.text + more, None))
                event = after
            if isinstance(event, Finished):
                finished = event
            elif event is None and await request.is_disconnected():
                return
        if finished.reason == "error":
            yield data(error_body(finished.error or "generation failed", "server_error"))
        else:
            yield data({**ids.chunk(None, _finish_reason(finished)), "loadstar": ids.extra(finished)})
            if include_usage:
                yield data(ids.usage_chunk(finished))
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a client that went away stops its own generation
