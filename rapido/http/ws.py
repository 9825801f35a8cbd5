"""``/ws/sessions/{id}``: speech in (binary PCM), control in (JSON), events out.

Reading is paced by the session: ``await session.feed`` waits while the jitter buffer
is full, and while it waits nothing more is read from the socket, so a sender that is
faster than real time is slowed by TCP back-pressure and never loses audio.

Events out are the session's typed events (:mod:`rapido.pipeline.events`) and this
socket's own replies (:class:`Ready`, :class:`Pong`, :class:`ErrorReply`), all in one
queue per connection; :func:`event_json` is the wire format of each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, assert_never

import orjson
from aiohttp import WSMsgType, web

from rapido.aio import cancel_and_wait
from rapido.http.api import get_session
from rapido.http.keys import ENGINE, METRICS, SETTINGS, WEBSOCKETS
from rapido.pipeline.audio import AudioFormatError, pcm_s16le
from rapido.pipeline.events import (
    Closed,
    PlaybackFinished,
    PlaybackStarted,
    Refill,
    SessionEvent,
    Underrun,
)
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.session import SessionClosed, StreamSession

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

CONTROL_TYPES = ("start", "end", "interrupt", "ping")
EVENT_QUEUE = 256  # events a client may fall behind before it is cut off
HEARTBEAT_S = 30.0  # pings that find a dead peer (the proxy's relays use it too)


def max_message_bytes(limit: int) -> int:
    """What aiohttp may read of one message for a ``max_ws_message_bytes`` of ``limit``:
    twice it (closed 1009 above). Between the two the handler answers an error event and
    keeps the connection, so one bad message costs one message."""
    return 2 * limit


@dataclass(frozen=True, slots=True)
class Ready:
    """The first message on every connection."""

    session_id: str
    lesson_id: str
    sample_rate: int
    audio_rate: int
    fps: int
    node: str
    state: str


@dataclass(frozen=True, slots=True)
class Pong:
    id: str | int | float | None = None  # the ping's id, echoed when it had one


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: str
    message: str


Outgoing = SessionEvent | Ready | Pong | ErrorReply


def event_json(ev: Outgoing) -> dict[str, Any]:
    """One outgoing message as the JSON object sent (keys in this order)."""
    match ev:
        case PlaybackStarted():
            return {"type": "playback_started", "utterance": ev.utterance}
        case PlaybackFinished():
            return {"type": "playback_finished", "utterance": ev.utterance,
                    "position_ms": ev.position_ms, "interrupted": ev.interrupted,
                    "reason": ev.reason}
        case Underrun():
            return {"type": "underrun", "utterance": ev.utterance,
                    "position_ms": ev.position_ms}
        case Refill():
            return {"type": "refill", "buffered_ms": ev.buffered_ms,
                    "target_ms": ev.target_ms}
        case Closed():
            return {"type": "closed", "reason": ev.reason}
        case Ready():
            return {"type": "ready", "session_id": ev.session_id,
                    "lesson_id": ev.lesson_id, "sample_rate": ev.sample_rate,
                    "audio_rate": ev.audio_rate, "fps": ev.fps, "node": ev.node,
                    "state": ev.state}
        case Pong():
            return {"type": "pong"} if ev.id is None else {"type": "pong", "id": ev.id}
        case ErrorReply():
            return {"type": "error", "code": ev.code, "message": ev.message}
        case _:
            assert_never(ev)


@routes.get("/ws/sessions/{session_id}")
async def session_socket(request: web.Request) -> web.WebSocketResponse:
    session = get_session(request)  # 404 before the upgrade, as JSON
    limit = request.app[SETTINGS].max_ws_message_bytes
    metrics = request.app[METRICS]
    ws = web.WebSocketResponse(max_msg_size=max_message_bytes(limit), heartbeat=HEARTBEAT_S)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    metrics.ws_connections.inc()
    events: asyncio.Queue[Outgoing | None] = asyncio.Queue(maxsize=EVENT_QUEUE)
    session.add_listener(events)
    writer = asyncio.get_running_loop().create_task(
        _write_events(ws, events), name=f"ws-writer-{session.id}")
    engine = request.app[ENGINE]

    def reply(event: Outgoing) -> None:
        """To this connection only: errors and pongs are nobody else's business."""
        try:
            events.put_nowait(event)
        except asyncio.QueueFull:
            pass  # a client this far behind is being cut off by the session anyway

    def error(code: str, message: str) -> None:
        metrics.bad_input.labels("ws", code).inc()
        reply(ErrorReply(code, message))

    reply(Ready(
        session_id=session.id, lesson_id=session.lesson_id,
        sample_rate=session.spec.sample_rate, audio_rate=AUDIO_RATE,
        fps=session.fps, node=engine.node_id, state=session.state,
    ))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                data: bytes = msg.data
                if len(data) > limit:
                    error("message_too_large",
                          f"binary message of {len(data)} bytes is over the {limit} byte "
                          "limit; send smaller chunks (20-100 ms of PCM is typical)")
                    continue
                try:
                    samples = pcm_s16le(data)
                except AudioFormatError as exc:
                    error(exc.code, str(exc))
                    continue
                await session.feed(samples)
            elif msg.type == WSMsgType.TEXT:
                if len(msg.data) > limit:
                    error("message_too_large", f"text message is over the {limit} byte limit")
                    continue
                await _control(session, msg.data, reply, error)
            elif msg.type == WSMsgType.ERROR:
                log.info("session %s: websocket error: %s", session.id, ws.exception())
                break
    except SessionClosed:
        pass
    finally:
        session.unsubscribe(events)
        request.app[WEBSOCKETS].discard(ws)
        await cancel_and_wait([writer])
        metrics.ws_connections.dec()
    return ws


async def _control(session: StreamSession, text: str, reply: Callable[[Outgoing], None],
                   error: Callable[[str, str], None]) -> None:
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        error("invalid_json", "text messages must be JSON objects like {\"type\": \"end\"}")
        return
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        error("invalid_message", "a control message is a JSON object with a string 'type'")
        return
    kind = msg["type"]
    if kind == "ping":
        echo = msg.get("id")
        if isinstance(echo, str | int | float) and not isinstance(echo, bool):
            reply(Pong(echo))
        else:
            reply(Pong())
    elif kind == "start":
        session.start_utterance()
    elif kind == "end":
        await session.end_utterance()
    elif kind == "interrupt":
        session.interrupt()
    else:
        error("unknown_type", f"unknown message type {kind!r}; expected one of "
              f"{', '.join(CONTROL_TYPES)}")


async def _write_events(ws: web.WebSocketResponse,
                        events: asyncio.Queue[Outgoing | None]) -> None:
    try:
        while True:
            ev = await events.get()
            if ev is None:
                break
            await ws.send_str(orjson.dumps(event_json(ev)).decode())
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away; the reader notices and cleans up
    finally:
        if not ws.closed:
            await ws.close()
