"""API keys: a user key for /v1 and /metrics, a separate admin key for /admin. Constant-time checks."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from loadstar.api.errors import ApiError


def _bearer(request: Request) -> str | None:
    """The key a client sent: ``Authorization: Bearer KEY``, or ``x-api-key: KEY`` (Anthropic's clients)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key", "").strip() or None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class ApiKeys:
    """``user_key`` None: /v1 is open (allowed on loopback only, see Settings). ``admin_key`` None: /admin is off."""

    def __init__(self, user_key: str | None, admin_key: str | None) -> None:
        self.user_key = user_key
        self.admin_key = admin_key

    async def require_user(self, request: Request) -> str:
        """Check the key; return the queue owner for this caller (one per key, never the key itself).
        Async: it does no blocking work, and a sync dependency would take a worker thread per request."""
        given = _bearer(request)
        if self.user_key is None:
            client = request.client.host if request.client else "unknown"
            return f"api:{client}"
        if given is not None and (_matches(given, self.user_key) or (self.admin_key is not None and _matches(given, self.admin_key))):
            return "api:" + hashlib.sha256(given.encode()).hexdigest()[:12]
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_request_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def require_admin(self, request: Request) -> None:
        if self.admin_key is None:
            raise ApiError(403, "the admin API is off: start the server with --admin-key", "permission_error")
        given = _bearer(request)
        if not _matches(given, self.admin_key):
            if given is not None and self.user_key is not None and _matches(given, self.user_key):
                raise ApiError(403, "this key may not use the admin API", "permission_error")
            raise ApiError(401, "missing or wrong admin key", "invalid_request_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
