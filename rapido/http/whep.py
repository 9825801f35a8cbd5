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
"""

from __future__ import annotations

from aiohttp import web

from rapido.http.errors import ApiError, bad_request, not_found
from rapido.http.keys import ENGINE, METRICS, SETTINGS
from rapido.http.tokens import VIEWER_PURPOSE, check_token, derive_secret, mint_token
from rapido.pipeline.session import StreamSession
from rapido.pipeline.sinks.base import SinkError
from rapido.webrtc import InvalidOffer, WebRtcSink

VIEWER_SECRET = web.AppKey("viewer_secret", bytes)

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
    sid = request.match_info["session_id"]
    session = request.app[ENGINE].sessions.get(sid)
    if session is None:
        raise not_found("session", sid)
    # Authorise before saying anything more about the session.
    _authorise(request, sid)
    if not isinstance(session.sink, WebRtcSink):
        raise ApiError(409, "not_webrtc", f"session {sid!r} has sink {session.spec.sink!r}; "
                       "create it with sink 'webrtc' to watch it over WHEP")
    return sid, session.sink


@routes.post("/whep/{session_id}")
async def whep_offer(request: web.Request) -> web.Response:
    sid, sink = _sink(request)
    mime = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if mime != "application/sdp":
        raise ApiError(415, "unsupported_media_type", "send the SDP offer as application/sdp")
    body = await request.read()
    try:
        offer = body.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("invalid_sdp", "the SDP offer is not UTF-8 text") from None
    try:
        viewer_id, answer = await sink.add_viewer(offer)
    except InvalidOffer as exc:
        raise bad_request("invalid_sdp", str(exc)) from None
    except SinkError as exc:
        raise ApiError(503, "viewers_unavailable", str(exc),
                       headers={"Retry-After": "5"}) from None
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": f"/whep/{sid}/{viewer_id}"})


@routes.delete("/whep/{session_id}/{viewer_id}")
async def whep_delete(request: web.Request) -> web.Response:
    _, sink = _sink(request)
    viewer_id = request.match_info["viewer_id"]
    if not await sink.remove_viewer(viewer_id):
        raise not_found("viewer", viewer_id)
    return web.Response(status=200)
