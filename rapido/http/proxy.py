"""Every node answers every session URL: a request for a session on another node is
relayed to that node (its owner), or redirected there, so a client may talk to any node.

The node's ``Locate`` (``make_app(..., locate=...)``, stored under ``keys.LOCATE``;
absent on a single node) says where a session lives: ``None`` serve here, ``Remote``
relay to that node, ``Lost`` its node is gone (404 ``node_lost``: create the lesson's
session again, any node places it anew). Only the session-scoped preserved paths are
routed (:data:`SESSION_ROUTES`); everything else is this node's own.

:func:`proxy_middleware` sits after the auth middleware, so only authenticated requests
are relayed (the owner checks them again: nodes of a cluster share the API key, hence the
token secrets), and before the body middleware, so a body is streamed to the owner as it
arrives, never read whole here: the owner's own checks (413 and 429 from Content-Length,
the read timeout) answer as if the client had come to it directly.

HTTP (:func:`proxy_http`) keeps the method, path, query, body and the client's ``Host``
(the owner writes the session JSON's URLs with it, so they name the node the client
asked), drops hop-by-hop headers and adds ``X-Forwarded-For``, ``X-Forwarded-Proto`` and
``X-Rapido-Hop``; a request that has been relayed :data:`MAX_HOPS` times already, and
would be again, is answered 508 ``loop_detected`` (two nodes whose views disagree). An
owner that cannot be reached is 502 ``node_unreachable``. With ``cluster_redirect`` set,
REST and WHEP are answered 307 to the owner instead.

WebSockets (:func:`proxy_ws`) are always relayed: the owner is connected first, so its
refusal (404, 401) reaches the client as that HTTP answer; then one task per direction
copies messages, each awaiting its send before it reads the next, so back-pressure holds
end to end. The owner ends a session's socket after a ``closed`` event (relayed as it
is); a socket to the owner that ends otherwise, or whose node turns ``Lost`` meanwhile,
ends the client's with ``{"type": "closed", "reason": "node_lost"}``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from rapido.aio import cancel_and_wait
from rapido.http.errors import ApiError, bad_request
from rapido.http.forwarded import HOP_HEADER, forwarded_host, forwarded_proto
from rapido.http.keys import LOCATE, METRICS, SETTINGS, WEBSOCKETS
from rapido.http.locate import Locate, Lost, Remote, Where
from rapido.http.ws import HEARTBEAT_S, max_message_bytes

__all__ = [
    "CLIENT", "HOP_HEADER", "MAX_HOPS", "SESSION_ROUTES", "Locate", "Lost", "Remote",
    "Where", "proxy_http", "proxy_middleware", "proxy_ws", "setup",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The one client session a node relays with (created only when it has a ``Locate``).
CLIENT = web.AppKey("proxy_client", aiohttp.ClientSession)

#: The preserved paths that name a session, by their route's canonical form. A bad
#: method on one (405) or any other path never leaves this node.
SESSION_ROUTES = frozenset({
    "/api/sessions/{session_id}",
    "/api/sessions/{session_id}/audio",
    "/api/sessions/{session_id}/interrupt",
    "/ws/sessions/{session_id}",
    "/whep/{session_id}",
    "/whep/{session_id}/{viewer_id}",
})

#: Relays a request may have been through before it is relayed again. One is the normal
#: case (client -> front -> owner); a second lets a node whose view is a moment behind
#: pass a request on; a third means the views disagree, and it would circle.
MAX_HOPS = 2
CONNECT_TIMEOUT_S = 2.0
#: How often a relayed WebSocket asks whether its node is still there.
LOST_POLL_S = 0.5
#: How long closing a socket to the owner waits for its answer (a lost node never does).
UPSTREAM_CLOSE_TIMEOUT_S = 2.0

#: RFC 9110 7.6.1's connection-specific fields, and the obsolete ones still seen.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
_HOPS = re.compile(r"[0-9]{1,3}")


def setup(app: web.Application, locate: Locate) -> None:
    """Make ``app`` route sessions by ``locate`` (``proxy_middleware`` is always in
    ``make_app``'s chain; without a ``Locate`` it passes everything through)."""
    app[LOCATE] = locate
    app.cleanup_ctx.append(_client_ctx)


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # No pool limit: a relayed WebSocket holds its connection for its whole life, and
    # what is relayed is bounded by what this node accepts. Idle connections are dropped
    # well before the owner's keep-alive timeout (http_read_timeout_s, the same on every
    # node) so a request never goes out on one the owner is closing.
    connector = aiohttp.TCPConnector(
        limit=0, keepalive_timeout=min(15.0, settings.http_read_timeout_s / 2))
    client = aiohttp.ClientSession(
        connector=connector,
        # Connecting is bounded; nothing else is: a response or a socket may stream for
        # as long as the session lasts, and the client's own timeouts still apply.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S,
                                      sock_read=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,  # bytes pass as sent, Content-Encoding and all
        # Only what the client sent: no User-Agent, Accept or Content-Type of our own.
        skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING,
                           hdrs.CONTENT_TYPE),
    )
    app[CLIENT] = client
    yield
    await client.close()


# -- routing ------------------------------------------------------------------------------

@web.middleware
async def proxy_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    locate = request.app.get(LOCATE)
    if locate is None:
        return await handler(request)
    route = _session_route(request)
    if route is None:
        return await handler(request)
    sid = request.match_info["session_id"]
    where = locate(sid)
    if where is None:
        return await handler(request)
    metrics = request.app[METRICS]
    websocket = route.startswith("/ws/")
    kind = "ws" if websocket else "redirect" if request.app[SETTINGS].cluster_redirect \
        else "http"
    if isinstance(where, Lost):
        metrics.proxy_requests.labels(kind, "lost").inc()
        return node_lost(sid, where.node_id).response()
    if kind == "redirect":
        metrics.proxy_requests.labels(kind, "ok").inc()
        # 307, not 302: the client repeats the method and the body (an offer, audio).
        return web.Response(status=307, headers={hdrs.LOCATION: _target(request, where)})
    hops = _hops(request)
    if hops >= MAX_HOPS:
        metrics.proxy_requests.labels(kind, "loop").inc()
        return ApiError(
            508, "loop_detected",
            f"this request for session {sid!r} was relayed {hops} times between nodes "
            "that disagree on where it lives; retry in a few seconds").response()
    # /whep is outside the API-key middleware: a viewer presents a viewer token, which
    # only the owner checks (whep.py). Relaying it unchecked gives nobody more than the
    # owner would: the owner answers, 401 included.
    if websocket:
        return await proxy_ws(request, where, sid)
    return await proxy_http(request, where)


def _session_route(request: web.Request) -> str | None:
    """The canonical form of the matched route when it is a session-scoped one."""
    info = request.match_info
    if getattr(info, "http_exception", None) is not None:
        return None  # no route, or a method the path does not take: ours to answer
    resource = getattr(getattr(info, "route", None), "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical if canonical in SESSION_ROUTES else None


def _hops(request: web.Request) -> int:
    raw = request.headers.get(HOP_HEADER)
    if raw is None:
        return 0
    if not _HOPS.fullmatch(raw.strip()):
        raise bad_request("invalid_hop", f"{HOP_HEADER} is set by rapido nodes: a count "
                          "of 0-999 relays; leave it out")
    return int(raw)


def node_lost(sid: str, node_id: str) -> ApiError:
    return ApiError(404, "node_lost",
                    f"session {sid!r} lived on node {node_id!r}, which has failed or left "
                    "the cluster; create the lesson's session again (POST /api/sessions): "
                    "any node places it anew")


def _unreachable(request: web.Request, remote: Remote, exc: BaseException) -> web.Response:
    # The owner's URL is in the log, not the answer: /whep callers are viewers, not
    # API clients, and the cluster's addresses are for key holders.
    log.warning("node %s at %s: %s %s not relayed: %s: %s", remote.node_id, remote.url,
                request.method, request.path, type(exc).__name__, exc)
    return ApiError(502, "node_unreachable",
                    f"node {remote.node_id!r}, which holds this session, could not be "
                    f"reached ({type(exc).__name__}); retry in a few seconds").response()


def _target(request: web.Request, remote: Remote) -> str:
    """The owner's URL for this request: its base URL + the path and query as sent."""
    return remote.url.rstrip("/") + request.raw_path


# -- headers ------------------------------------------------------------------------------

def _dropped(headers: MultiMapping[str]) -> set[str]:
    """Hop-by-hop names, with those the Connection header lists."""
    listed = {name.strip().lower() for value in headers.getall(hdrs.CONNECTION, [])
              for name in value.split(",")}
    return set(HOP_BY_HOP) | listed


def forward_headers(request: web.Request, remote: Remote) -> CIMultiDict[str]:
    """What the owner is sent: the client's headers less hop-by-hop ones, plus where the
    request came from and how many relays it has been through."""
    drop = _dropped(request.headers)
    # Expect: this node already answered it (aiohttp sends 100 Continue itself). The
    # WebSocket handshake's own fields belong to the one being made upstream.
    drop |= {"expect", HOP_HEADER.lower()}
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in request.headers.items()
        if name.lower() not in drop and not name.lower().startswith("sec-websocket-"))
    if not request.app[SETTINGS].api_key:
        # Keyless nodes listen on loopback and refuse a Host or Origin that is not their
        # own (DNS rebinding, auth.check_local). This node has checked both against
        # itself; the owner is sent its own (and X-Forwarded-Host names this one).
        parts = urlsplit(remote.url)
        out[hdrs.HOST] = parts.netloc
        if hdrs.ORIGIN in out:
            out[hdrs.ORIGIN] = f"{parts.scheme}://{parts.netloc}"
    peer = request.remote
    if peer:
        before = request.headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{before}, {peer}" if before else peer
    # The owner writes the URLs of its answers for the node the client asked
    # (http/forwarded.py reads these on requests marked with the hop header).
    out["X-Forwarded-Host"] = forwarded_host(request)
    out["X-Forwarded-Proto"] = forwarded_proto(request)
    out[HOP_HEADER] = str(_hops(request) + 1)
    return out


def _response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    drop = _dropped(upstream.headers)
    return CIMultiDict((name, value) for name, value in upstream.headers.items()
                       if name.lower() not in drop)


# -- HTTP ---------------------------------------------------------------------------------

async def proxy_http(request: web.Request, remote: Remote) -> web.StreamResponse:
    """Relay ``request`` to ``remote`` and its answer back, both bodies streamed."""
    metrics = request.app[METRICS]
    start = time.perf_counter()
    # The body as it arrives: with the client's Content-Length when it sent one (aiohttp
    # then streams it under that length), chunked otherwise.
    body = request.content if request.body_exists else None
    try:
        upstream = await request.app[CLIENT].request(
            request.method, URL(_target(request, remote), encoded=True),
            headers=forward_headers(request, remote), data=body, allow_redirects=False)
    except (aiohttp.ClientError, TimeoutError) as exc:
        metrics.proxy_requests.labels("http", "unreachable").inc()
        return _unreachable(request, remote, exc)
    async with upstream:  # released, and the body's writer stopped, on every way out
        metrics.proxy_first_byte.labels("http").observe(time.perf_counter() - start)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=_response_headers(upstream))
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except ConnectionResetError:
            metrics.proxy_requests.labels("http", "ok").inc()
            return response  # the client left; nothing more to send it
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The owner went away mid-body. The status line is sent: all that is left is
            # to cut the connection, so the client sees a truncated body, not an ending
            # (aiohttp's final chunk) that would pass for a whole one.
            log.warning("node %s: the answer to %s %s broke off: %s: %s", remote.node_id,
                        request.method, request.path, type(exc).__name__, exc)
            metrics.proxy_requests.labels("http", "unreachable").inc()
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
    metrics.proxy_requests.labels("http", "ok").inc()
    return response


# -- WebSocket ----------------------------------------------------------------------------

class _Ended(enum.Enum):
    OWNER_CLOSED = "owner_closed"  # the owner closed it (after a closed event, or 1000)
    UPSTREAM_LOST = "upstream_lost"  # ended any other way: the node is gone
    CLIENT_GONE = "client_gone"


async def proxy_ws(request: web.Request, remote: Remote, sid: str) -> web.StreamResponse:
    """Relay a session's WebSocket to ``remote``, both ways, until either side ends it."""
    if not web.WebSocketResponse().can_prepare(request).ok:
        return await proxy_http(request, remote)  # not an upgrade: the owner's 400
    app = request.app
    metrics = app[METRICS]
    limit = max_message_bytes(app[SETTINGS].max_ws_message_bytes)
    start = time.perf_counter()
    try:
        upstream = await app[CLIENT].ws_connect(
            URL(_target(request, remote), encoded=True),
            headers=forward_headers(request, remote), max_msg_size=limit,
            heartbeat=HEARTBEAT_S, compress=0,  # PCM does not deflate; spare the CPU
            timeout=aiohttp.ClientWSTimeout(ws_close=UPSTREAM_CLOSE_TIMEOUT_S))
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 101:  # it upgraded, but not as a WebSocket does
            metrics.proxy_requests.labels("ws", "unreachable").inc()
            return _unreachable(request, remote, exc)
        # The owner refused the upgrade (an unknown session, a bad token). aiohttp drops
        # the body of a refused handshake, so ask again without the upgrade: the owner's
        # checks come before it, so its answer (status and JSON) is the same one.
        metrics.proxy_requests.labels("ws", "ok").inc()
        return await proxy_http(request, remote)
    except (aiohttp.ClientError, TimeoutError) as exc:
        metrics.proxy_requests.labels("ws", "unreachable").inc()
        return _unreachable(request, remote, exc)
    metrics.proxy_first_byte.labels("ws").observe(time.perf_counter() - start)

    ws = web.WebSocketResponse(max_msg_size=limit, heartbeat=HEARTBEAT_S)
    try:
        await ws.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    app[WEBSOCKETS].add(ws)  # closed at shutdown like the node's own
    metrics.proxy_websockets.inc()
    loop = asyncio.get_running_loop()
    up = loop.create_task(_client_to_owner(ws, upstream), name=f"relay-up-{sid}")
    down = loop.create_task(_owner_to_client(upstream, ws), name=f"relay-down-{sid}")
    watch = loop.create_task(_until_lost(app[LOCATE], sid), name=f"relay-watch-{sid}")
    outcome = "ok"
    try:
        await asyncio.wait((up, down, watch), return_when=asyncio.FIRST_COMPLETED)
        if up.done():
            up.result()  # raises what the relay raised, if it did: logged below
        ended = down.result() if down.done() else None
        if watch.done() or ended is _Ended.UPSTREAM_LOST:
            outcome = "lost"
            await cancel_and_wait([up, down])
            log.info("session %s: node %s lost; its relayed WebSocket ends", sid,
                     remote.node_id)
            await _send_node_lost(ws)
            await ws.close(code=WSCloseCode.GOING_AWAY)
        elif ended is _Ended.OWNER_CLOSED:
            await cancel_and_wait([up])
            await ws.close(code=_relayable(upstream.close_code))
        else:  # the client closed (or vanished): the owner is told the same
            await cancel_and_wait([down])
            await upstream.close(code=_relayable(ws.close_code))
    except Exception:
        # The upgrade is sent: no error answer can follow it (error_middleware's would
        # be written into the socket's stream). Log it; both sides are closed below.
        log.exception("session %s: relaying its WebSocket to node %s failed", sid,
                      remote.node_id)
    finally:
        await cancel_and_wait([up, down, watch])
        if not upstream.closed:
            await upstream.close()
        if not ws.closed:
            await ws.close(code=WSCloseCode.GOING_AWAY)
        app[WEBSOCKETS].discard(ws)
        metrics.proxy_websockets.dec()
        metrics.proxy_requests.labels("ws", outcome).inc()
    return ws


async def _client_to_owner(src: web.WebSocketResponse,
                           dst: aiohttp.ClientWebSocketResponse) -> None:
    """Each message sent before the next is read: a slow owner slows the client."""
    try:
        async for msg in src:
            if msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
    except ConnectionResetError:
        pass  # the owner's side is gone; the other direction finds out why


async def _owner_to_client(src: aiohttp.ClientWebSocketResponse,
                           dst: web.WebSocketResponse) -> _Ended:
    said_closed = False
    try:
        async for msg in src:
            if msg.type == WSMsgType.TEXT:
                said_closed = said_closed or _is_closed_event(msg.data)
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
    except ConnectionResetError:
        return _Ended.CLIENT_GONE
    # ws.py closes a session's socket after its closed event; with 1000 and no event it
    # has cut off a client that fell too far behind (relayed as such). Any other ending
    # (1001 at its shutdown, a reset, a missed heartbeat) means the node is gone.
    if said_closed or src.close_code == WSCloseCode.OK:
        return _Ended.OWNER_CLOSED
    return _Ended.UPSTREAM_LOST


def _is_closed_event(text: str) -> bool:
    if '"closed"' not in text:  # most messages: no parse
        return False
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and event.get("type") == "closed"


async def _until_lost(locate: Locate, sid: str) -> Lost:
    while True:
        await asyncio.sleep(LOST_POLL_S)
        where = locate(sid)
        if isinstance(where, Lost):
            return where


async def _send_node_lost(ws: web.WebSocketResponse) -> None:
    try:
        await ws.send_str(orjson.dumps({"type": "closed", "reason": "node_lost"}).decode())
    except ConnectionResetError:
        pass


def _relayable(code: int | None) -> int:
    """A close code one side gave, as the other may be sent it: 1005/1006/1015 (and
    anything unregistered) are never sent on the wire; those become 1000."""
    if code is not None and (1000 <= code <= 1003 or 1007 <= code <= 1014
                             or 3000 <= code <= 4999):
        return code
    return WSCloseCode.OK
