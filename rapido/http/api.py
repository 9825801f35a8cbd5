"""REST handlers under ``/api``: sessions, uploads, interrupts. Validation lives here,
at the edge; the engine only ever sees checked values."""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import orjson
from aiohttp import web

from rapido.engine import AdmissionError, Engine, SinkUnavailable, UnknownAvatar
from rapido.http.errors import ApiError, bad_request, json_response, not_found
from rapido.http.keys import ENGINE, ROUTER, SETTINGS, UPLOADS, WS_SECRET, base_url
from rapido.http.tokens import mint_token
from rapido.http.whep import viewer_fields
from rapido.pipeline.audio import (
    AudioFormatError,
    Pcm,
    check_rate,
    l16_pcm,
    l16_rate,
    parse_wav,
)
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.session import QueueFull, SessionClosed, SessionSpec, StreamSession
from rapido.pipeline.sinks import SINK_NAMES as SINKS
from rapido.pipeline.sinks.base import SinkError

LESSON_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
USER_ID = re.compile(r"[^\x00-\x1f\x7f]{1,128}")
CREATE_FIELDS = {"lesson_id", "user_id", "user_location", "avatar", "sample_rate", "sink",
                 "agent_identity", "room"}
IDENTITY = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")

routes = web.RouteTableDef()


async def read_json(request: web.Request) -> dict[str, Any]:
    if not request.app[SETTINGS].api_key:
        # Keyless mode: a cross-site form can post text/plain without a preflight; it
        # cannot post application/json.
        mime = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if mime != "application/json":
            raise ApiError(415, "unsupported_media_type",
                           "send the JSON body with Content-Type: application/json")
    body = await request.read()
    if not body:
        raise bad_request("invalid_json", "request body is empty; send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request("invalid_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("invalid_json", "request body must be a JSON object")
    return data


def parse_create(data: dict[str, Any], default_sink: str) -> SessionSpec:
    unknown = sorted(set(data) - CREATE_FIELDS)
    if unknown:
        raise bad_request("unknown_field", f"unknown field(s): {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(CREATE_FIELDS))}")
    lesson_id = data.get("lesson_id")
    if lesson_id is None:
        raise bad_request("missing_lesson_id", "lesson_id is required")
    if not isinstance(lesson_id, str) or not LESSON_ID.fullmatch(lesson_id):
        raise bad_request("invalid_lesson_id",
                          "lesson_id must be 1-64 characters of A-Z a-z 0-9 _ -")
    user_id = data.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not USER_ID.fullmatch(user_id)):
        raise bad_request("invalid_user_id", "user_id must be a string of 1-128 characters "
                          "without control characters")
    location = _parse_location(data.get("user_location"))
    avatar = data.get("avatar", "default")
    if not isinstance(avatar, str) or not NAME.fullmatch(avatar):
        raise bad_request("invalid_avatar", "avatar must be a name of 1-64 characters of "
                          "A-Z a-z 0-9 _ . -")
    rate = data.get("sample_rate", 16_000)
    try:
        check_rate(rate)
    except AudioFormatError as exc:
        raise bad_request(exc.code, str(exc)) from None
    sink = data.get("sink", default_sink)
    if sink not in SINKS:
        raise bad_request("invalid_sink", f"sink must be one of {', '.join(SINKS)}")
    agent = data.get("agent_identity")
    room = data.get("room")
    for key, value in (("agent_identity", agent), ("room", room)):
        if value is not None and (not isinstance(value, str) or not IDENTITY.fullmatch(value)):
            raise bad_request(f"invalid_{key}", f"{key} must be 1-128 characters of "
                              "A-Z a-z 0-9 _ . : @ -")
    if (agent is not None or room is not None) and "sink" in data and sink != "livekit":
        raise bad_request("invalid_sink", "agent_identity and room need the livekit sink")
    if agent is not None or room is not None:
        sink = "livekit"  # an agent's avatar publishes into the agent's LiveKit room
    return SessionSpec(lesson_id=lesson_id, user_id=user_id, user_location=location,
                       avatar=avatar, sample_rate=rate, sink=sink, agent_identity=agent,
                       room=room)


def _parse_location(value: Any) -> Any:
    """Either a region code ("eu-west") or {"lat": .., "lon": ..} in degrees."""
    if value is None:
        return None
    if isinstance(value, str):
        if not NAME.fullmatch(value):
            raise bad_request("invalid_user_location",
                              "user_location as a string must be a region code of 1-64 "
                              "characters of A-Z a-z 0-9 _ . -")
        return value
    if isinstance(value, dict) and set(value) == {"lat", "lon"}:
        lat, lon = value["lat"], value["lon"]
        if (all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lat, lon))
                and math.isfinite(lat) and math.isfinite(lon)
                and -90 <= lat <= 90 and -180 <= lon <= 180):
            return {"lat": float(lat), "lon": float(lon)}
    raise bad_request("invalid_user_location",
                      'user_location must be a region code or {"lat": -90..90, '
                      '"lon": -180..180}')


def session_json(request: web.Request, session: StreamSession) -> dict[str, Any]:
    """A session as the API shows it: where to send speech, its live stats, what its
    sink adds (a LiveKit region and viewer token), and for a webrtc session a WHEP URL
    and viewer token (never the API key: viewers are not API clients). ``ws_token`` is a
    short-lived token for this session's WebSocket alone (``ws_url?token=``), for
    browsers, which cannot send the key in a header."""
    url = base_url(request)
    ws_base = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    settings = request.app[SETTINGS]
    engine = request.app[ENGINE]
    spec = session.spec
    body: dict[str, Any] = {
        "session_id": session.id,
        "lesson_id": session.lesson_id,
        "user_id": spec.user_id,
        "user_location": spec.user_location,
        "room_name": spec.room or f"lesson_{session.lesson_id}",
        "agent_identity": spec.agent_identity,
        "state": session.state,
        "node": engine.node_id,
        "region": settings.region,
        "avatar": spec.avatar,
        "sink": spec.sink,
        "sample_rate": spec.sample_rate,
        "audio_rate": AUDIO_RATE,
        "fps": settings.fps,
        "width": settings.width,
        "height": settings.height,
        "ws_url": f"{ws_base}/ws/sessions/{session.id}",
        "ws_token": mint_token(request.app[WS_SECRET], session.id, settings.ws_token_ttl_s),
        "audio_url": f"{url}/api/sessions/{session.id}/audio",
        "created_at": _iso(session.created_at),
        "stats": session.stats(),
        **engine.describe(session),
    }
    if spec.sink == "webrtc":
        body.update(viewer_fields(request.app, session, url))
    return body


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def get_session(request: web.Request) -> StreamSession:
    sid = request.match_info["session_id"]
    session = request.app[ENGINE].sessions.get(sid)
    if session is None:
        raise not_found("session", sid)
    return session


@routes.post("/api/sessions")
async def create_session(request: web.Request) -> web.Response:
    data = await read_json(request)
    spec = parse_create(data, request.app[SETTINGS].default_sink)
    router = request.app.get(ROUTER)
    if router is not None:
        return await router.create(request, spec, orjson.dumps(data),
                                   lambda: _create_here(request, spec))
    return await _create_here(request, spec)


async def _create_here(request: web.Request, spec: SessionSpec) -> web.Response:
    engine: Engine = request.app[ENGINE]
    try:
        session, created = await engine.create_session(spec)
    except AdmissionError as exc:
        raise ApiError(503, exc.code, str(exc),
                       headers={"Retry-After": str(exc.retry_after_s)}) from None
    except SinkUnavailable as exc:
        raise ApiError(400, "sink_unavailable", str(exc)) from None
    except UnknownAvatar as exc:
        raise ApiError(404, "avatar_not_found", str(exc)) from None
    except SinkError as exc:  # e.g. the recordings directory is not writable
        raise ApiError(500, "sink_failed", f"could not start the {spec.sink} sink: {exc}") \
            from None
    body = session_json(request, session)
    headers = {"Location": f"/api/sessions/{session.id}"}
    return json_response(body, status=201 if created else 200, headers=headers)


@routes.get("/api/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return json_response({"sessions": [session_json(request, s)
                                       for s in engine.sessions.values()]})


@routes.get("/api/sessions/{session_id}")
async def show_session(request: web.Request) -> web.Response:
    session = get_session(request)
    return json_response(session_json(request, session))


@routes.delete("/api/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    session = get_session(request)
    engine = request.app[ENGINE]
    await engine.close_session(session.id, "deleted")
    return json_response(session_json(request, session))


@routes.post("/api/sessions/{session_id}/interrupt")
async def interrupt_session(request: web.Request) -> web.Response:
    session = get_session(request)
    try:
        result = session.interrupt()
    except SessionClosed as exc:
        raise not_found("session", session.id) from exc
    return json_response({"session_id": session.id, **result})


WAV_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave")


@routes.post("/api/sessions/{session_id}/audio")
async def upload_audio(request: web.Request) -> web.Response:
    """Checks in order of cost: the session, the media type, the number of uploads in
    progress (429 ``too_many_uploads``, body unread), the length the header gives against
    what is left of the session's queue (429 ``queue_full``, nothing decoded). The upload
    is then queued as the bytes sent; it is decoded and resampled block by block, off
    the event loop, as it plays (``StreamSession._feed_queued``)."""
    session = get_session(request)
    ctype = request.headers.get("Content-Type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if request.content_length == 0:
        raise bad_request("empty_audio", "the request body holds no audio")
    if mime not in WAV_TYPES and mime != "audio/l16":
        raise ApiError(415, "unsupported_media_type",
                       "send audio/wav or audio/L16;rate=N (PCM s16 mono)")
    slots = request.app[UPLOADS]
    if not slots.try_take():
        raise ApiError(429, "too_many_uploads",
                       f"this node is reading {slots.limit} uploads already; retry shortly",
                       headers={"Retry-After": "1"})
    try:
        pcm = await _read_pcm(request, session, ctype, mime)
    finally:
        slots.release()
    try:
        queued_ms = session.enqueue_utterance(pcm)
    except QueueFull as exc:
        raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": "5"}) from None
    except SessionClosed as exc:
        raise not_found("session", session.id) from exc
    return json_response({
        "session_id": session.id,
        "duration_ms": round(1000.0 * pcm.samples48 / AUDIO_RATE, 1),
        "input_sample_rate": pcm.rate,
        "queued_ms": round(queued_ms, 1),
    }, status=202)


async def _read_pcm(request: web.Request, session: StreamSession, ctype: str,
                    mime: str) -> Pcm:
    """The body, read and checked (header, length against the queue, float samples
    finite): as sent if it is at most 2 bytes a frame, else decoded to mono int16 at its
    own rate, never resampled (a queued upload holds no more than that)."""
    limit = request.app[SETTINGS].max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    try:
        if mime == "audio/l16":
            rate, _ = l16_rate(ctype)
            if length is not None:  # L16's length is known before the body is read
                _check_queue(session, length // 2 * AUDIO_RATE // rate)
        body = await read_body(request, limit)
        if not body:
            raise bad_request("empty_audio", "the request body holds no audio")
        pcm = l16_pcm(ctype, body) if mime == "audio/l16" else parse_wav(body)
        if pcm.frames == 0:
            raise bad_request("empty_audio", "the audio holds no samples")
        _check_queue(session, pcm.samples48)
        if pcm.block_align > 2:  # stereo, 24/32-bit, float: to mono int16, off the loop
            pcm = await asyncio.get_running_loop().run_in_executor(None, pcm.compact)
    except AudioFormatError as exc:
        raise ApiError(415 if exc.code.startswith("unsupported") else 400, exc.code,
                       str(exc)) from None
    return pcm


def _check_queue(session: StreamSession, samples48: int) -> None:
    try:
        session.check_queue(samples48)
    except QueueFull as exc:
        raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": "5"}) from None
    except SessionClosed as exc:
        raise not_found("session", session.id) from exc


async def read_body(request: web.Request, limit: int) -> bytearray:
    """The body in one buffer, sized from Content-Length when there is one: aiohttp's
    ``read()`` lets its stream buffer grow to the limit and copies the body twice more."""
    length = request.content_length
    if length is not None and length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=length)
    buf = bytearray(length or 0)
    filled = 0
    while chunk := await request.content.readany():
        end = filled + len(chunk)
        if end > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=end)
        if end <= len(buf):
            buf[filled:end] = chunk
        else:
            del buf[filled:]
            buf += chunk
        filled = end
    del buf[filled:]
    return buf
