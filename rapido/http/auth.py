"""Who may call what.

With an API key: ``/api`` needs ``Authorization: Bearer <key>``. A session's WebSocket
(``/ws/sessions/{id}``) takes the key the same way (servers), or that session's own
short-lived WebSocket token (``ws_token`` in the session JSON) as ``?token=`` or a Bearer
header (browsers, which cannot set headers on a WebSocket): the key itself never goes
into a URL. ``/whep`` takes viewer tokens, checked in ``whep.py``.

Without an API key the node listens on loopback only, and a web page the user opens
elsewhere must not drive it: :func:`check_local` refuses a ``Host`` that is not this
node on a loopback name (DNS rebinding) and an ``Origin`` that is not this node's own
(cross-site requests and WebSockets); JSON bodies must say ``application/json``
(``api.read_json``), which a cross-site form cannot send without a preflight.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from rapido.http.errors import ApiError
from rapido.http.tokens import bearer, check_token, presented_token, unauthorized

#: Paths anyone may read: liveness, readiness, metrics, the API description, the page.
PUBLIC_PREFIXES = ("/health", "/ready", "/metrics", "/api/openapi.json", "/static/")
LOOPBACK_NAMES = ("localhost", "localhost.")


def needs_auth(path: str) -> bool:
    if path == "/" or path.startswith(PUBLIC_PREFIXES):
        return False
    return path.startswith(("/api", "/ws"))


def has_key(request: web.Request, key: str) -> bool:
    """Whether the request presents the API key as ``Authorization: Bearer``."""
    header = request.headers.get("Authorization", "")
    if not key or not header:
        return False
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              key.encode())


def check_bearer(request: web.Request, key: str, ws_secret: bytes) -> None:
    """Raise 401 unless the request carries the key (or, on a session's WebSocket, that
    session's WebSocket token)."""
    if request.path.startswith("/ws"):
        _check_ws(request, key, ws_secret)
        return
    header = request.headers.get("Authorization", "")
    if not header:
        raise unauthorized("missing API key: send Authorization: Bearer <key>")
    if not hmac.compare_digest(bearer(header).encode(), key.encode()):
        raise unauthorized("wrong API key")


def _check_ws(request: web.Request, key: str, ws_secret: bytes) -> None:
    if "access_token" in request.query:
        raise unauthorized("?access_token= is no longer accepted (the API key must not go "
                           "into a URL): pass the session's ws_token as ?token=, or send "
                           "Authorization: Bearer <key>")
    token = presented_token(request)
    if not token:
        raise unauthorized("missing credentials: pass the session's ws_token as ?token= "
                           "or send Authorization: Bearer <API key>")
    if hmac.compare_digest(token.encode(), key.encode()):
        return
    session_id = request.match_info.get("session_id")
    if not session_id:
        raise unauthorized("wrong API key")
    check_token(ws_secret, session_id, token, what="WebSocket token", realm="rapido")


# -- keyless loopback mode ----------------------------------------------------------------

def check_local(request: web.Request, public_url: str) -> None:
    """Keyless mode: refuse (403) requests a web page elsewhere could make through the
    user's browser: a ``Host`` that is not this node on a loopback name or address (DNS
    rebinding), an ``Origin`` that is not this node's own (cross-site)."""
    port = _local_port(request)
    allowed = {host for host in _loopback_hosts(port)}
    public = urlsplit(public_url) if public_url else None
    if public is not None and public.netloc:
        allowed.add(public.netloc.lower())
    host = request.headers.get("Host", "").lower()
    if not _host_allowed(host, port, allowed):
        raise ApiError(403, "forbidden_host",
                       f"Host {host!r} is not this node: without an api_key only loopback "
                       f"names with port {port} (e.g. 127.0.0.1:{port}, localhost:{port}) "
                       "are served (DNS rebinding protection); set public_url if a proxy "
                       "on this machine forwards another name")
    origin = request.headers.get("Origin")
    if origin is None:
        return
    parsed = urlsplit(origin)
    if (parsed.scheme in ("http", "https") and parsed.netloc
            and _host_allowed(parsed.netloc.lower(), port, allowed)):
        return
    raise ApiError(403, "forbidden_origin",
                   f"Origin {origin!r} is not this node: without an api_key only pages "
                   "served by this node may call it (cross-site request protection)")


def _local_port(request: web.Request) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return int(sockname[1])
    return 0


def _loopback_hosts(port: int) -> list[str]:
    return [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"]


def _host_allowed(host: str, port: int, allowed: set[str]) -> bool:
    if host in allowed:
        return True
    name, port_text = _split_host(host)
    if port_text is None:
        port_text = "80"  # a Host without a port names port 80
    if port_text != str(port):
        return False
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(host: str) -> tuple[str, str | None]:
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    return (name, port) if sep else (host, None)
