"""Mount the Gradio page at ``/`` on the HTTP application built by ``api.app``."""

from __future__ import annotations

import gradio as gr
from fastapi import FastAPI

from engine.engine import Engine
from webui.ui import build_ui


def mount_ui(app: FastAPI, engine: Engine) -> FastAPI:
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
