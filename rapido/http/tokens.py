"""Short-lived tokens scoped to one session: WHEP viewer tokens and WebSocket tokens.

A token is ``<expiry>.<hmac>``: the expiry in Unix seconds and the hex HMAC-SHA256 of
``session_id`` and the expiry under a node secret. A token for one session is refused for
any other, and a token past its expiry is refused.

Each kind of token has its own secret, derived from the API key with domain separation
(``HMAC(api_key, purpose)``): every node sharing the key can check a token another minted,
a viewer token is never a WebSocket token (nor the other way round), and neither secret is
the key itself. Without an API key each secret is random, per node process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from aiohttp import web

from rapido.http.errors import ApiError

#: The purposes the secrets are derived for (a new version string rotates every token).
VIEWER_PURPOSE = "rapido viewer token v1"
WS_PURPOSE = "rapido ws token v1"


def derive_secret(api_key: str, purpose: str) -> bytes:
    """The secret for ``purpose``: HMAC(api_key, purpose), or random without a key."""
    if not api_key:
        return secrets.token_bytes(32)
    return hmac.new(api_key.encode(), purpose.encode(), hashlib.sha256).digest()


def mint_token(secret: bytes, session_id: str, ttl_s: float, now: float | None = None) -> str:
    expiry = int((time.time() if now is None else now) + ttl_s)
    return f"{expiry}.{_mac(secret, session_id, expiry)}"


def check_token(secret: bytes, session_id: str, token: str, now: float | None = None, *,
                what: str = "viewer token", realm: str = "rapido-whep") -> None:
    """Raise 401 unless ``token`` is a live token for ``session_id`` under ``secret``."""
    expiry_s, _, mac = token.partition(".")
    # ASCII digits only, and no more than any real expiry has: str.isdigit() also takes
    # '²' (which int() refuses), and int() refuses more than 4300 digits.
    if not (expiry_s.isascii() and expiry_s.isdigit()) or len(expiry_s) > 20 or not mac:
        raise unauthorized(f"malformed {what}", realm)
    expiry = int(expiry_s)
    if not hmac.compare_digest(mac.encode(), _mac(secret, session_id, expiry).encode()):
        raise unauthorized(f"wrong {what} for this session", realm)
    if expiry < (time.time() if now is None else now):
        raise unauthorized(f"the {what} has expired; get a new one from the session API",
                           realm)


def presented_token(request: web.Request) -> str:
    """What the request presents: ``Authorization: Bearer <token>`` or ``?token=``
    (browsers cannot set headers on a WebSocket or a ``<video>``). Empty: nothing."""
    header = request.headers.get("Authorization", "")
    if header:
        return bearer(header)
    return request.query.get("token", "")


def bearer(header: str, realm: str = "rapido") -> str:
    """The token of an ``Authorization: Bearer <token>`` header (401 if malformed)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise unauthorized("Authorization must be 'Bearer <token>'", realm)
    return value.strip()


def unauthorized(message: str, realm: str = "rapido") -> ApiError:
    return ApiError(401, "unauthorized", message,
                    headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})


def _mac(secret: bytes, session_id: str, expiry: int) -> str:
    return hmac.new(secret, f"{session_id}\n{expiry}".encode(), hashlib.sha256).hexdigest()
