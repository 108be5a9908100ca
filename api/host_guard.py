"""Host and Origin checks in front of everything the server answers (the API and the web UI).

- Loopback mode: a request whose ``Host`` is not a loopback name (``localhost``, ``127.x.x.x``,
  ``[::1]``) is refused with 421. A page on another site that rebinds its own DNS name to
  127.0.0.1 sends its own name as ``Host``, so it never reaches the app (DNS rebinding).
- Every mode: ``Access-Control-Allow-*`` headers leave the server only for an origin named with
  ``--cors-origin``. Gradio's own middleware echoes any origin when the Host is not loopback; this
  strips that, so the README's "no CORS headers unless --cors-origin" holds for every route.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loadstar.engine.settings import is_loopback_host


def host_name(host_header: str) -> str:
    """``example.com:7860`` → ``example.com``; ``[::1]:7860`` → ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostGuard:
    def __init__(self, app: ASGIApp, *, loopback_only: bool, cors_origins: tuple[str, ...]) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.cors_origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.loopback_only and not is_loopback_host(host_name(headers.get("host", ""))):
            await self._refuse(scope, send, receive)
            return
        origin = headers.get("origin", "").rstrip("/").lower()
        if origin in self.cors_origins:
            await self.app(scope, receive, send)
            return

        async def without_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-allow-")
                ]
            await send(message)

        await self.app(scope, receive, without_cors)

    async def _refuse(self, scope: Scope, send: Send, receive: Receive) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": "this server answers only to localhost (Host header refused)",
                                     "type": "invalid_request_error", "param": None, "code": "host_not_allowed"}}).encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
