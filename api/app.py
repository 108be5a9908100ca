"""The HTTP application: the API (and health, metrics) on a FastAPI app the web UI is mounted into."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from loadstar.api.errors import install_error_handlers
from loadstar.api.limits import BodyLimit
from loadstar.api.messages_api import build_messages_router
from loadstar.api.openai_routes import build_router
from loadstar.api.security import ApiKeys
from loadstar.api.serving import ServingLimits
from loadstar.engine.facade import Engine


def build_http_app(engine: Engine) -> FastAPI:
    settings = engine.settings
    app = FastAPI(
        title="Loadstar API",
        version="0.1.0",
        description="OpenAI-compatible chat and text completions over the loaded model, plus admin endpoints.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.api_enabled else None,
    )
    install_error_handlers(app)

    @app.get("/health")
    def health() -> dict:
        # Unauthenticated by design (for probes): says nothing about which model is loaded. ``model_problem``:
        # why none is, after its worker crashed (the same line the UI's model line shows), else null.
        return {"status": "ok", "model_loaded": engine.loaded is not None, "model_problem": engine.model_problem}

    if settings.api_enabled:
        keys = ApiKeys(settings.api_key, settings.admin_key)
        app.include_router(build_router(engine, keys, queue_timeout=settings.queue_timeout,
                                        max_tokens_cap=settings.api_max_tokens,
                                        load_on_request=settings.load_on_request))
        limits = ServingLimits(settings.queue_timeout, settings.api_max_tokens, settings.load_on_request)
        app.include_router(build_messages_router(engine, keys, limits))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # no CORS headers at all unless an allow-list is given
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
