"""``POST /api/demo``: a webrtc session that speaks a built-in utterance.

The viewer page's Demo button calls it and plays the session it returns. The speech is
synthetic (``speech_like``: syllable-rate modulated harmonics, so the mouth moves), about
six seconds in three utterances with pauses. The first starts a moment after the
session is created so a viewer has time to connect. When the script has played out the
session ends by itself, ``demo_grace_s`` later (a press nobody watches costs a few
seconds of a stream, not a stream until the idle timeout). Under ``/api``, so the
API-key rules apply.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import numpy as np
from aiohttp import web

from rapido.aio import cancel_and_wait
from rapido.engine import AdmissionError, Engine
from rapido.http.api import session_json
from rapido.http.errors import ApiError, json_response
from rapido.http.keys import ENGINE, SETTINGS
from rapido.pipeline.audio import resample
from rapido.pipeline.events import SessionEvent
from rapido.pipeline.session import QueueFull, SessionClosed, SessionSpec, StreamSession
from rapido.pipeline.sinks.base import SinkError
from rapido.pipeline.speech import speech_like

log = logging.getLogger(__name__)

#: (delay before queueing in s, seconds of speech): ~6 s of speech with pauses between.
SCRIPT = ((1.5, 2.2), (2.8, 1.8), (2.4, 2.0))
INPUT_RATE = 16_000
#: How long the script's speech may take to play out before the session ends anyway.
PLAYOUT_LIMIT_S = 30.0

DEMO_TASKS = web.AppKey("demo_tasks", set[asyncio.Task[None]])

routes = web.RouteTableDef()


def setup(app: web.Application) -> None:
    """Add the route and the set of running demo scripts, cancelled at cleanup."""
    app[DEMO_TASKS] = set()
    app.add_routes(routes)
    app.on_cleanup.append(_cancel_tasks)


def utterances(seed: int = 0) -> list[np.ndarray]:
    """The demo's speech at 48 kHz, one array per utterance."""
    return [resample(speech_like(seconds, rate=INPUT_RATE, seed=seed + i), INPUT_RATE)
            for i, (_, seconds) in enumerate(SCRIPT)]


@routes.post("/api/demo")
async def start_demo(request: web.Request) -> web.Response:
    spec = SessionSpec(lesson_id=f"demo-{secrets.token_hex(3)}", sink="webrtc")
    try:
        session, _ = await request.app[ENGINE].create_session(spec)
    except AdmissionError as exc:
        raise ApiError(503, exc.code, str(exc),
                       headers={"Retry-After": str(exc.retry_after_s)}) from None
    except SinkError as exc:
        raise ApiError(500, "sink_failed", f"could not start the webrtc sink: {exc}") \
            from None
    tasks = request.app[DEMO_TASKS]
    grace = request.app[SETTINGS].demo_grace_s
    task = asyncio.create_task(_run(request.app[ENGINE], session, grace),
                               name=f"demo-{session.id}")
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return json_response(session_json(request, session), status=201,
                         headers={"Location": f"/api/sessions/{session.id}"})


async def _run(engine: Engine, session: StreamSession, grace_s: float) -> None:
    """Speak the script, let it play out, wait ``grace_s``, end the session."""
    events = session.subscribe()
    try:
        if await _speak(session):
            await _played_out(session, events)
            await asyncio.sleep(grace_s)
    finally:
        session.unsubscribe(events)
    if await engine.close_session(session.id, "demo_finished"):
        log.info("demo %s finished", session.id)


async def _played_out(session: StreamSession,
                      events: asyncio.Queue[SessionEvent | None]) -> None:
    """Until the queued speech has played out (woken by the session's events), at most
    ``PLAYOUT_LIMIT_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PLAYOUT_LIMIT_S
    while session.busy and loop.time() < deadline:
        try:
            if await asyncio.wait_for(events.get(), 1.0) is None:
                return  # the session closed
        except TimeoutError:
            pass


async def _speak(session: StreamSession) -> bool:
    """Queue the script's utterances; False if the session went away meanwhile."""
    loop = asyncio.get_running_loop()
    speech = await loop.run_in_executor(None, utterances)
    for (delay, _), samples48 in zip(SCRIPT, speech, strict=True):
        await asyncio.sleep(delay)
        try:
            session.enqueue_utterance(samples48)
        except (SessionClosed, QueueFull) as exc:
            log.info("demo %s stopped: %s", session.id, exc)
            return False
    return True


async def _cancel_tasks(app: web.Application) -> None:
    running: set[asyncio.Task[None]] = app[DEMO_TASKS]
    await cancel_and_wait(list(running))
