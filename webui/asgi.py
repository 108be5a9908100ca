"""Mount the Gradio page at ``/`` on the HTTP application built by ``api.app``."""

from __future__ import annotations

import gradio as gr
from fastapi import FastAPI
from starlette.routing import Mount

from loadstar.api.host_guard import HostGuard
from loadstar.engine.facade import Engine
from loadstar.webui.frontend_fixes import serve_mended
from loadstar.webui.session_binding import SessionBinding
from loadstar.webui.ui import CSS, HEAD, build_ui

MAX_UPLOAD = "20mb"  # the largest file a page may upload (a conversation import is at most 20 MiB)
# How often Gradio's queue looks for a new event, and for progress to send, when it has none: its own
# defaults (1 ms and 10 ms) wake the server's event loop 1,100 times a second, idle or not, and on a
# 2-core machine each wake takes a core from the model's threads (API decode 124 -> 140 tok/s measured
# with these). A click waits 10 ms more on average before its handler starts.
QUEUE_POLL_SECONDS = 0.02
PROGRESS_POLL_SECONDS = 0.1


def mount_ui(app: FastAPI, engine: Engine) -> FastAPI:
    settings = engine.settings
    auth = list(settings.auth) or None
    demo = build_ui(engine)
    demo.queue(default_concurrency_limit=1)
    _calm_queue(demo)
    serve_mended(app)  # before the mount: these routes come first
    app = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=auth,
        auth_message="Loadstar: sign in" if auth else None,
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        server_name=settings.host,
        server_port=settings.port,
        footer_links=[],
        # Gradio would copy every event's inputs and outputs (whole conversations) into each browser's
        # storage, rewriting it all on every streamed update, and offer to send them to a Hugging Face
        # bucket: conversations are the app's own, kept on the server.
        run_history=False,
        css=CSS,
        head=HEAD,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[str(engine.conversations.exports.resolve())],
    )
    # Gradio checks that a file input was really uploaded only once it believes it has launched;
    # mounted, it never does, so a client could name any server path as "its" upload.
    demo.has_launched = True
    if auth:
        gradio_app = next(r.app for r in app.routes if isinstance(r, Mount) and hasattr(r.app, "tokens"))
        app.add_middleware(SessionBinding, user_of=lambda cookies: _login(gradio_app, cookies))
    app.add_middleware(HostGuard, loopback_only=settings.is_loopback, cors_origins=settings.cors_origins)
    return app


def _calm_queue(demo: gr.Blocks) -> None:
    """Gradio's queue polls; poll less often (see QUEUE_POLL_SECONDS)."""
    queue = getattr(demo, "_queue", None)
    if queue is None or not hasattr(queue, "sleep_when_free"):
        return  # another Gradio: nothing to calm
    queue.sleep_when_free = QUEUE_POLL_SECONDS
    queue.progress_update_sleep_when_free = PROGRESS_POLL_SECONDS


def _login(gradio_app: object, cookies: dict[str, str]) -> str | None:
    cookie_id = getattr(gradio_app, "cookie_id", "")
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return getattr(gradio_app, "tokens", {}).get(token) if token else None
