"""A Gradio session belongs to the login that opened it.

Gradio keys a page's state (the open conversation, its event stream) by a ``session_hash`` that
the browser chooses. With logins on, a second user who sent someone else's ``session_hash`` would
be served that page's state. This ASGI middleware binds each ``session_hash`` to the first login
that uses it and refuses (403) any other login that names it: in a query string, in the heartbeat
path, or in the JSON body of ``queue/join`` and ``cancel``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_SESSIONS = 100_000
MAX_BODY = 8 * 1024 * 1024  # larger JSON bodies are not parsed here (Gradio bounds them itself)
UserOf = Callable[[dict[str, str]], "str | None"]  # cookies -> login


class SessionBinding:
    def __init__(self, app: ASGIApp, user_of: UserOf, prefix: str = "/gradio_api/") -> None:
        self.app = app
        self.user_of = user_of
        self.prefix = prefix
        self._owners: OrderedDict[str, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        hashes = set(parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", []))
        rest = path[len(self.prefix):]
        if rest.startswith("heartbeat/"):
            hashes.add(rest.split("/")[1])
        if scope.get("method") == "POST" and rest.rstrip("/") in ("queue/join", "cancel"):
            body, receive = await _buffered(receive)
            try:
                data = json.loads(body) if 0 < len(body) <= MAX_BODY else {}
            except (ValueError, RecursionError):
                data = {}
            if isinstance(data, dict) and isinstance(data.get("session_hash"), str):
                hashes.add(data["session_hash"])
        if hashes and not self._claim(hashes, _cookies(scope)):
            body = b'{"error": "this session belongs to another login"}'
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _claim(self, hashes: set[str], cookies: dict[str, str]) -> bool:
        user = self.user_of(cookies)
        if user is None:
            return True  # not logged in: Gradio answers 401 itself
        for session in hashes:
            owner = self._owners.get(session)
            if owner is not None and owner != user:
                return False
        for session in hashes:
            self._owners[session] = user
            self._owners.move_to_end(session)
        while len(self._owners) > MAX_SESSIONS:
            self._owners.popitem(last=False)
        return True


def _cookies(scope: Scope) -> dict[str, str]:
    from http.cookies import SimpleCookie

    jar: SimpleCookie = SimpleCookie()
    for key, value in scope.get("headers", []):
        if key.lower() == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except Exception:
                continue
    return {name: morsel.value for name, morsel in jar.items()}


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole body, and a ``receive`` that replays it to the app."""
    chunks = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
