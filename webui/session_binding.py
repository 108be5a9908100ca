"""A Gradio session belongs to the login that opened it.

Gradio keys a page's state (the open conversation, its event stream) by a ``session_hash`` that
the browser chooses. With logins on, a second user who sent someone else's ``session_hash`` would
be served that page's state. This ASGI middleware binds each ``session_hash`` to the first login
that uses it and refuses (403) any other login that names it: in a query string, in the heartbeat
path, or in the JSON body of ``queue/join`` and ``cancel``; without a login, a request that names a
session is refused (401). An uploaded file is readable (``file=``) only by the logins that uploaded it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import parse_qs, unquote

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
        self._uploads: OrderedDict[str, set[str]] = OrderedDict()  # uploaded file path -> the logins that sent it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        rest = path[len(self.prefix):]
        if rest.startswith("upload") and scope.get("method") == "POST":
            await self._record_upload(scope, receive, send)
            return
        if rest.startswith("file="):
            user = self.user_of(_cookies(scope))
            owners = self._uploads.get(unquote(rest[len("file="):]))
            if owners is not None and user not in owners:
                # An upload is its sender's: Gradio serves any file in its upload folder to any
                # login that names its path, and that path is derived from the file's contents.
                await _refuse(send, 403, "this file belongs to another login")
                return
        hashes = set(parse_qs(scope.get("query_string", b"").decode("latin-1")).get("session_hash", []))
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
        refusal = self._claim(hashes, _cookies(scope)) if hashes else None
        if refusal is not None:
            await _refuse(send, *refusal)
            return
        await self.app(scope, receive, send)

    async def _record_upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the upload on, and note the paths Gradio answers with as the uploader's."""
        user = self.user_of(_cookies(scope))
        status = 0
        chunks: list[bytes] = []

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and sum(len(chunk) for chunk in chunks) <= MAX_BODY:
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, watch)
        if status != 200 or user is None:
            return
        try:
            paths = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            return
        for uploaded in paths if isinstance(paths, list) else ():
            if isinstance(uploaded, str):
                self._uploads.setdefault(uploaded, set()).add(user)
                self._uploads.move_to_end(uploaded)
        while len(self._uploads) > MAX_SESSIONS:
            self._uploads.popitem(last=False)

    def _claim(self, hashes: set[str], cookies: dict[str, str]) -> tuple[int, str] | None:
        """None if the login may use these sessions (they are now its own), else (status, why)."""
        user = self.user_of(cookies)
        if user is None:
            # Not every Gradio route checks the login itself: the heartbeat answered, and its
            # closing stopped the session's reply. No route that names a session runs without one.
            return 401, "log in first"
        for session in hashes:
            owner = self._owners.get(session)
            if owner is not None and owner != user:
                return 403, "this session belongs to another login"
        for session in hashes:
            self._owners[session] = user
            self._owners.move_to_end(session)
        while len(self._owners) > MAX_SESSIONS:
            self._owners.popitem(last=False)
        return None


async def _refuse(send: Send, status: int, why: str) -> None:
    body = json.dumps({"error": why}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
