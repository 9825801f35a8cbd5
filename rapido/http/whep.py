"""WHEP: viewers pull a session's audio and video over WebRTC.

``POST /whep/{session_id}`` takes an SDP offer and answers 201 with the SDP answer and
``Location: /whep/{session_id}/{viewer_id}``; ``DELETE`` on that location ends the
viewer. Only sessions created with sink ``webrtc`` have viewers.

Viewers are not API clients: they never see the API key. The session API hands out a
viewer token scoped to one session, ``<expiry>.<hmac>``, where the HMAC-SHA256 is over
``session_id`` and the expiry under a node secret (derived from the API key when one is
set, so every node sharing the key can check it; else random per app; see
:mod:`rapido.http.tokens`). It is taken as
``Authorization: Bearer <token>`` or ``?token=`` (a ``<video>`` page may not set
headers). The API-key middleware only covers ``/api`` and ``/ws``, so ``/whep`` is
checked here alone.

An offer is at most :data:`MAX_OFFER_BYTES` (413 above, read no further). Trickle ICE
(RFC 9725 PATCH) is not offered: a PATCH is answered 405, an offer with candidates is
taken as complete, and a viewer not connected within ``whep_connect_timeout_s`` is
closed (see :mod:`rapido.webrtc.sink`).
"""

from __future__ import annotations

from aiohttp import web

from rapido.http.errors import ApiError, bad_request, not_found
from rapido.http.keys import ENGINE, METRICS, SETTINGS
from rapido.http.tokens import VIEWER_PURPOSE, check_token, derive_secret, mint_token
from rapido.pipeline.session import StreamSession
from rapido.pipeline.sinks.base import SinkError
from rapido.webrtc import InvalidOffer, SinkClosed, WebRtcSink

VIEWER_SECRET = web.AppKey("viewer_secret", bytes)

#: The largest SDP offer taken. A browser's offer is a few KiB (its candidates
#: included); the API's 16 MiB body limit would let one request hold the loop while
#: the offer is parsed (twice: checked here, then by aiortc).
MAX_OFFER_BYTES = 64 * 1024

routes = web.RouteTableDef()


def setup(app: web.Application) -> None:
    """Add the routes, the node secret and the ``webrtc_encoders`` gauge to ``app``."""
    app[VIEWER_SECRET] = derive_secret(app[SETTINGS].api_key, VIEWER_PURPOSE)
    app.add_routes(routes)
    engine = app[ENGINE]

    def encoders() -> float:
        # Read at scrape time: nothing to keep in step as viewers come and go.
        return float(sum(sum(s.sink.encoder_counts().values())
                         for s in list(engine.sessions.values())
                         if isinstance(s.sink, WebRtcSink)))

    app[METRICS].webrtc_encoders.set_function(encoders)


def viewer_fields(app: web.Application, session: StreamSession, base: str) -> dict[str, str]:
    """What the session API adds for a webrtc session."""
    token = mint_token(app[VIEWER_SECRET], session.id, app[SETTINGS].webrtc_token_ttl_s)
    return {"viewer_token": token, "whep_url": f"{base}/whep/{session.id}"}


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message,
                    headers={"WWW-Authenticate": 'Bearer realm="rapido-whep"'})


def _authorise(request: web.Request, session_id: str) -> None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized("Authorization must be 'Bearer <viewer token>'")
        token = value.strip()
    else:
        token = request.query.get("token", "")
    if not token:
        raise _unauthorized("missing viewer token: send Authorization: Bearer <viewer_token>")
    check_token(request.app[VIEWER_SECRET], session_id, token)


def _sink(request: web.Request) -> tuple[str, WebRtcSink]:
    sid, _, sink = _session(request)
    return sid, sink


def _session(request: web.Request) -> tuple[str, StreamSession, WebRtcSink]:
    sid = request.match_info["session_id"]
    session = request.app[ENGINE].sessions.get(sid)
    if session is None:
        raise not_found("session", sid)
    # Authorise before saying anything more about the session.
    _authorise(request, sid)
    if not isinstance(session.sink, WebRtcSink):
        raise ApiError(409, "not_webrtc", f"session {sid!r} has sink {session.spec.sink!r}; "
                       "create it with sink 'webrtc' to watch it over WHEP")
    return sid, session, session.sink


def _closing(sid: str) -> ApiError:
    return ApiError(409, "session_closing",
                    f"session {sid!r} is closing; it takes no new viewers")


def _full(message: str) -> ApiError:
    return ApiError(503, "viewers_unavailable", message, headers={"Retry-After": "5"})


async def _read_offer(request: web.Request) -> bytes:
    """The body, at most :data:`MAX_OFFER_BYTES`; 413 as soon as it is over."""
    too_large = ApiError(413, "body_too_large",
                         f"the SDP offer is over the {MAX_OFFER_BYTES} byte limit")
    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        raise too_large
    body = bytearray()
    while len(body) <= MAX_OFFER_BYTES:
        chunk = await request.content.read(MAX_OFFER_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    if len(body) > MAX_OFFER_BYTES:
        raise too_large
    return bytes(body)


@routes.post("/whep/{session_id}")
async def whep_offer(request: web.Request) -> web.Response:
    sid, session, sink = _session(request)
    mime = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if mime != "application/sdp":
        raise ApiError(415, "unsupported_media_type", "send the SDP offer as application/sdp")
    # Refused before the body is read; the slot itself is taken in add_viewer, before
    # its first await, so offers answered at the same time cannot overshoot.
    if session.closed or sink.closing:
        raise _closing(sid)
    if sink.full:
        raise _full(f"this stream has its limit of {sink.max_viewers} viewers")
    body = await _read_offer(request)
    try:
        offer = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("invalid_sdp", "the SDP offer is not UTF-8 text") from None
    try:
        viewer_id, answer = await sink.add_viewer(offer)
    except InvalidOffer as exc:
        raise bad_request("invalid_sdp", str(exc)) from None
    except SinkClosed:
        raise _closing(sid) from None
    except SinkError as exc:
        raise _full(str(exc)) from None
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": f"/whep/{sid}/{viewer_id}"})


@routes.delete("/whep/{session_id}/{viewer_id}")
async def whep_delete(request: web.Request) -> web.Response:
    _, sink = _sink(request)
    viewer_id = request.match_info["viewer_id"]
    if not await sink.remove_viewer(viewer_id):
        raise not_found("viewer", viewer_id)
    return web.Response(status=200)
