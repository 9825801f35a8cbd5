"""Bearer-key auth for ``/api`` and ``/ws``."""

from __future__ import annotations

import hmac

from aiohttp import web

from rapido.http.errors import ApiError

#: Paths anyone may read: liveness, readiness, metrics, the API description, the page.
PUBLIC_PREFIXES = ("/health", "/ready", "/metrics", "/api/openapi.json", "/static/")


def needs_auth(path: str) -> bool:
    if path == "/" or path.startswith(PUBLIC_PREFIXES):
        return False
    return path.startswith(("/api", "/ws"))


def check_bearer(request: web.Request, key: str) -> None:
    """Raise 401 unless the request carries the key. Browsers cannot set headers on a
    WebSocket, so ``/ws`` also takes ``?access_token=``."""
    header = request.headers.get("Authorization", "")
    token = ""
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("Authorization must be 'Bearer <key>'")
        token = value.strip()
    elif request.path.startswith("/ws"):
        token = request.query.get("access_token", "")
    if not token:
        raise _unauthorized("missing API key: send Authorization: Bearer <key>")
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise _unauthorized("wrong API key")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message,
                    headers={"WWW-Authenticate": 'Bearer realm="rapido"'})
