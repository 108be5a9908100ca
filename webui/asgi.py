"""The web application: a FastAPI app with the Gradio page mounted at ``/`` and a health check."""

from __future__ import annotations

from typing import Any

import gradio as gr
from fastapi import FastAPI

from engine.engine import Engine
from webui.ui import build_ui


def build_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="Loadstar", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        # Unauthenticated by design (for probes), so it says nothing about which model is loaded.
        return {"status": "ok", "model_loaded": engine.models.loaded is not None}

    auth = list(engine.settings.auth) or None
    demo = build_ui(engine)
    demo.queue(default_concurrency_limit=1)
    return gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        auth_message="Loadstar: sign in" if auth else None,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        server_name=engine.settings.host,
        server_port=engine.settings.port,
        footer_links=[],
    )
