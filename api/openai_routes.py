"""The OpenAI-compatible API and the admin endpoints, as a FastAPI router (health lives in app.py).

Generation goes through the same engine queue as the web UI, so API clients and browser users
are served fairly (round-robin by owner: an API key counts as one owner); serving.py turns a
request's events into the HTTP answer, responses.py shapes it as OpenAI does, schemas.py holds
the request models.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from loadstar.api.errors import ApiError
from loadstar.api.metrics_text import render_metrics
from loadstar.api.responses import chat_message, embeddings_body, job_dict, loaded_dict, tool_use
from loadstar.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DownloadRequest,
    EmbeddingRequest,
    LoadRequest,
)
from loadstar.api.security import ApiKeys
from loadstar.api.serving import ServingLimits, generate, load_named
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import BadRequestError, LoadstarError, ModelNotFoundError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.models.loader_api import OutputSpec


def build_router(
    engine: Engine, keys: ApiKeys, *, queue_timeout: float, max_tokens_cap: int, load_on_request: bool = False
) -> APIRouter:
    router = APIRouter()
    limits = ServingLimits(queue_timeout, max_tokens_cap, load_on_request)
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
            messages = tuple(chat_message(m) for m in body.messages)
            if body.character is not None and not any(m.role == "system" for m in messages):
                # the folder of no login, and extensions': files and hooks, read off the event loop
                character = await anyio.to_thread.run_sync(engine.characters.find, None, body.character)
                messages = (ChatMessage(role="system", content=character.system_message()), *messages)
            tools = tool_use(body)
            output = OutputSpec(json_schema=body.json_schema(), logprobs=body.top_logprobs_wanted())
        except (BadRequestError, ValidationError, ValueError) as error:
            raise ApiError(400, problem_line(error), "invalid_request_error") from None
        return await generate(engine, limits, request, body, owner, chat=True, messages=messages, tools=tools, output=output)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, owner: str = user) -> Any:
        output = OutputSpec(logprobs=body.logprobs)
        return await generate(engine, limits, request, body, owner, chat=False, prompt=body.prompt_text(), output=output)

    @router.post("/v1/embeddings", dependencies=[user])
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        if body.dimensions is not None:
            raise ApiError(400, "dimensions is not supported: the model's own embedding size is given",
                           "invalid_request_error", param="dimensions")
        if limits.load_on_request:
            await load_named(engine, body.model)
        target = body.model if engine.models_resident(body.model) else None
        try:
            info, vectors = await anyio.to_thread.run_sync(engine.embed, body.texts(), target)
        except BadRequestError as error:
            raise ApiError(400, str(error), "invalid_request_error", param="input") from None
        except LoadstarError as error:  # the model's worker crashed meanwhile, say
            raise ApiError(500, str(error), "server_error") from None
        return embeddings_body(info.name, vectors, body.encoding_format)

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
        return {"models": rows, "loaded": loaded_dict(engine)}

    @router.post("/admin/models/load", dependencies=[admin])
    async def admin_load(body: LoadRequest) -> dict[str, Any]:
        try:
            await anyio.to_thread.run_sync(engine.load_model, body.model, body.loader, body.options)
        except ModelNotFoundError as error:
            raise ApiError(404, str(error), "not_found_error", code="model_not_found") from None
        except LoadstarError as error:
            raise ApiError(400, str(error), "invalid_request_error", code="load_failed") from None
        return {"loaded": loaded_dict(engine)}

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
        return job_dict(job)

    @router.get("/admin/downloads/{job_id}", dependencies=[admin])
    def admin_download_progress(job_id: int) -> dict[str, Any]:
        job = engine.download_job(job_id)
        if job is None:
            raise ApiError(404, f"no download {job_id}", "not_found_error")
        return job_dict(job)

    return router
