"""``/ws/sessions/{id}``: speech in (binary PCM), control in (JSON), events out.

Reading is paced by the session: ``await session.feed`` waits while the jitter buffer
is full, and while it waits nothing more is read from the socket, so a sender that is
faster than real time is slowed by TCP back-pressure and never loses audio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
from aiohttp import WSMsgType, web

from rapido.aio import cancel_and_wait
from rapido.http.api import get_session
from rapido.http.keys import CONFIG, ENGINE, METRICS, WEBSOCKETS
from rapido.pipeline.audio import AudioFormatError, pcm_s16le
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.session import Event, SessionClosed, StreamSession

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

CONTROL_TYPES = ("start", "end", "interrupt", "ping")


@routes.get("/ws/sessions/{session_id}")
async def session_socket(request: web.Request) -> web.WebSocketResponse:
    session = get_session(request)  # 404 before the upgrade, as JSON
    limit = request.app[CONFIG].max_ws_message_bytes
    metrics = request.app[METRICS]
    # aiohttp itself closes (1009) above twice the limit; between the two we answer
    # with an error event and keep the connection, so one bad message costs one message.
    ws = web.WebSocketResponse(max_msg_size=2 * limit, heartbeat=30.0)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    metrics.ws_connections.inc()
    events = session.subscribe()
    writer = asyncio.get_running_loop().create_task(
        _write_events(ws, events), name=f"ws-writer-{session.id}")
    engine = request.app[ENGINE]

    def reply(event: Event) -> None:
        """To this connection only: errors and pongs are nobody else's business."""
        try:
            events.put_nowait(event)
        except asyncio.QueueFull:
            pass  # a client this far behind is being cut off by the session anyway

    def error(code: str, message: str) -> None:
        metrics.bad_input.labels("ws", code).inc()
        reply({"type": "error", "code": code, "message": message})

    reply({
        "type": "ready", "session_id": session.id, "lesson_id": session.lesson_id,
        "sample_rate": session.spec.sample_rate, "audio_rate": AUDIO_RATE,
        "fps": session.fps, "node": engine.node_id, "state": session.state,
    })
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


async def _control(session: StreamSession, text: str, reply: Callable[[Event], None],
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
        pong: Event = {"type": "pong"}
        if "id" in msg and isinstance(msg["id"], str | int | float) \
                and not isinstance(msg["id"], bool):
            pong["id"] = msg["id"]
        reply(pong)
    elif kind == "start":
        session.start_utterance()
    elif kind == "end":
        await session.end_utterance()
    elif kind == "interrupt":
        session.interrupt()
    else:
        error("unknown_type", f"unknown message type {kind!r}; expected one of "
              f"{', '.join(CONTROL_TYPES)}")


async def _write_events(ws: web.WebSocketResponse, events: asyncio.Queue[Event | None]) -> None:
    try:
        while True:
            ev = await events.get()
            if ev is None:
                break
            await ws.send_str(orjson.dumps(ev).decode())
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away; the reader notices and cleans up
    finally:
        if not ws.closed:
            await ws.close()
