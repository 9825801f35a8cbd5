"""A session tells its listeners typed events (rapido.pipeline.events), never wire dicts."""

from __future__ import annotations

import asyncio

from rapido.pipeline.events import (
    Closed,
    PlaybackFinished,
    PlaybackStarted,
    Refill,
    SessionEvent,
    Underrun,
)
from rapido.pipeline.session import SessionSpec, StreamSession
from tests.conftest import NodeFactory, speech, stretched_total

CHUNK = 320  # 20 ms at 16 kHz


async def say(session: StreamSession, seconds: float) -> None:
    audio = speech(seconds)
    session.start_utterance()
    for start in range(0, len(audio), CHUNK):
        await session.feed(audio[start : start + CHUNK])
    await session.end_utterance()


async def until(q: asyncio.Queue[SessionEvent | None], kind: type,
                timeout: float = 10.0) -> list[SessionEvent | None]:
    """Events up to and including the first of ``kind`` (or None)."""
    seen: list[SessionEvent | None] = []
    async with asyncio.timeout(timeout):
        while True:
            ev = await q.get()
            seen.append(ev)
            if ev is None or isinstance(ev, kind):
                return seen


async def test_a_session_emits_typed_events(make_node: NodeFactory) -> None:
    node = await make_node(model="none")
    session, _ = await node.engine.create_session(SessionSpec(lesson_id="typed",
                                                              sample_rate=16_000))
    q = session.subscribe()
    wide: asyncio.Queue[SessionEvent | str | None] = asyncio.Queue(maxsize=64)
    session.add_listener(wide)  # a queue that also carries the caller's own messages
    wide.put_nowait("mine")
    starved = session.subscribe(maxsize=1)  # never read: cut off, not grown

    await say(session, 0.6)
    seen = await until(q, PlaybackFinished)
    told = list(seen)
    assert all(isinstance(ev, PlaybackStarted | PlaybackFinished | Underrun | Refill)
               for ev in seen), seen
    started = [ev for ev in seen if isinstance(ev, PlaybackStarted)]
    finished = seen[-1]
    assert len(started) == 1 and isinstance(finished, PlaybackFinished)
    assert finished.utterance == started[0].utterance
    assert finished.interrupted is False and finished.reason == "end"
    assert abs(finished.position_ms - 600.0) <= 40.0
    assert finished.position_ms == round(finished.position_ms, 1)  # told to 0.1 ms
    assert session.jb.stats.emitted_samples == stretched_total(session.jb.stats)

    # Barge-in: the finish is typed too, interrupted, at a rounded position.
    speaker = asyncio.create_task(say(session, 3.0))
    told += await until(q, PlaybackStarted)
    await asyncio.sleep(0.3)
    speaker.cancel()  # the speaker stops sending (it waits on back-pressure by now)
    await asyncio.gather(speaker, return_exceptions=True)
    session.interrupt()
    told += await until(q, PlaybackFinished)
    stopped = told[-1]
    assert isinstance(stopped, PlaybackFinished)
    assert stopped.interrupted is True and stopped.reason == "interrupt"
    assert stopped.position_ms == round(stopped.position_ms, 1)

    assert await node.engine.close_session(session.id, "deleted")
    told += await until(q, Closed)
    assert told[-1] == Closed("deleted")
    assert q.get_nowait() is None and q.empty()

    # The wider queue got its own message, then the very same events, then None.
    got: list[SessionEvent | str | None] = []
    while not wide.empty():
        got.append(wide.get_nowait())
    assert got == ["mine", *told, None]

    assert starved.get_nowait() is None and starved.empty()
