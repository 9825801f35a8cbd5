"""StreamSession: one lesson's avatar stream, from speech in to frames out.

States: ``idle`` (silent, idle frames), ``speaking`` (an utterance is playing),
``interrupted`` (barge-in flushed everything; idle frames until the next utterance) and
``closed``. The engine's clock calls :meth:`tick` once per frame; everything else is
driven by the session's clients (WebSocket, HTTP uploads).

A little over 500 lines, as one class on purpose: ingest, playout, interrupts and events
share the session's state and its one lock-free order of operations on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rapido.aio import cancel_and_wait
from rapido.pipeline.audio import Pcm, Resampler
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.events import Closed, Listener, SessionEvent
from rapido.pipeline.jitter import (
    AudioJitterBuffer,
    JitterConfig,
    JitterEvent,
    PlaybackFinished,
    PlaybackStarted,
    Refill,
    Underrun,
)
from rapido.pipeline.media import AUDIO_RATE, MediaChunk
from rapido.pipeline.render import FrameJob, FrameRenderer
from rapido.pipeline.sinks.base import Sink

log = logging.getLogger(__name__)

IDLE = "idle"
SPEAKING = "speaking"
INTERRUPTED = "interrupted"
CLOSED = "closed"


class SessionClosed(RuntimeError):
    pass


class QueueFull(RuntimeError):
    """More queued speech than the session may hold."""


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A validated create request: the edge checked every field."""

    lesson_id: str
    user_id: str | None = None
    user_location: Any = None
    avatar: str = "default"
    sample_rate: int = 16_000
    sink: str = "null"
    agent_identity: str | None = None  # a LiveKit Agents voice agent this avatar serves
    room: str | None = None  # its LiveKit room (default: lesson_{lesson_id})


@dataclass(slots=True)
class SessionCounters:
    frames_out: int = 0
    speaking_frames: int = 0
    degraded_frames: int = 0
    late_frames: int = 0
    max_lateness_s: float = 0.0
    utterances: int = 0
    interrupts: int = 0
    played_ms: float = 0.0  # speech played out, all utterances together
    reported_received: int = 0  # samples already folded into the node's metrics
    reported_concealed: int = 0
    reported_removed: int = 0  # time-stretching, likewise
    reported_inserted: int = 0
    last_activity: float = field(default_factory=time.monotonic)


class StreamSession:
    def __init__(
        self,
        session_id: str,
        spec: SessionSpec,
        *,
        avatar: Avatar,
        sink: Sink,
        renderer: FrameRenderer,
        jitter: JitterConfig,
        fps: int,
        max_queued_s: float,
        node_id: str = "",
        on_event: Callable[[StreamSession, JitterEvent], None] | None = None,
        on_frame: Callable[[float, MediaChunk], None] | None = None,
    ) -> None:
        self.id = session_id
        self.spec = spec
        self.node_id = node_id
        self.avatar = avatar
        self.sink = sink
        self.renderer = renderer
        self.fps = fps
        self.frame_s = 1.0 / fps
        self.created_at = time.time()
        self.jb = AudioJitterBuffer(jitter)
        self.counters = SessionCounters()
        self._state = IDLE
        self._on_event = on_event
        self._on_frame = on_frame
        self._resampler = Resampler(spec.sample_rate)
        self._frame_index = 0
        self._utt: int | None = None  # utterance of the last frame, and its position
        self._utt_pos = 0
        self._pending: deque[FrameJob] = deque()
        self._listeners: set[Listener] = set()
        self._room = asyncio.Event()  # set while the jitter buffer can take more
        self._room.set()
        self._epoch = 0  # bumped by interrupt: feeds that started before it stop
        self.close_reason: str | None = None  # why it closed (the node's health counts errors)
        # HTTP uploads: whole utterances waiting for their turn to enter the buffer, each
        # with its length at AUDIO_RATE. An upload waits as the bytes the client sent and
        # is decoded and resampled block by block as it plays (see _feed_queued).
        self._queued: deque[tuple[np.ndarray | Pcm, int]] = deque()
        self._queued_samples = 0
        self._feeder: asyncio.Task[None] | None = None
        self._max_queued = int(max_queued_s * AUDIO_RATE)

    # -- info ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def lesson_id(self) -> str:
        return self.spec.lesson_id

    @property
    def closed(self) -> bool:
        return self._state == CLOSED

    @property
    def busy(self) -> bool:
        """Speech is playing, buffered, arriving or queued: closing now would cut it."""
        return bool(
            self.jb.buffered_samples or self.jb.receiving or self._queued
            or self._state == SPEAKING or self.jb.pending_utterances
        )

    @property
    def speaking(self) -> bool:
        return self._state == SPEAKING

    def stats(self) -> dict[str, Any]:
        c, js = self.counters, self.jb.stats
        return {
            "state": self._state,
            "buffer_state": self.jb.state,
            "buffered_ms": round(self.jb.buffered_ms, 1),
            "target_ms": round(self.jb.target_ms, 1),
            "queued_ms": round(1000.0 * self._queued_samples / AUDIO_RATE, 1),
            "underruns": js.underruns,
            "concealed_ms": round(1000.0 * js.concealed_samples / AUDIO_RATE, 1),
            "emitted_ms": round(1000.0 * js.emitted_samples / AUDIO_RATE, 1),
            "received_ms": round(1000.0 * js.received_samples / AUDIO_RATE, 1),
            "mean_buffer_delay_ms": round(js.mean_delay_ms, 1),
            "accelerated_ms": round(1000.0 * js.removed_samples_for_acceleration / AUDIO_RATE, 1),
            "decelerated_ms": round(1000.0 * js.inserted_samples_for_deceleration / AUDIO_RATE,
                                    1),
            "frames_out": c.frames_out,
            "speaking_frames": c.speaking_frames,
            "late_frames": c.late_frames,
            "degraded_frames": c.degraded_frames,
            "utterances": js.utterances_finished,
            "interrupts": c.interrupts,
            "playout_position_ms": round(self.jb.position_ms, 1),
            "played_ms": round(c.played_ms, 1),
            "current_utterance": self.jb.current_utterance,
            "sink": self.sink.stats().json(),
        }

    # -- ingest -----------------------------------------------------------------------

    async def feed(self, samples: np.ndarray) -> None:
        """Speech at the session's input rate. Waits (back-pressure) while the buffer is
        full; never drops. Returns early if the session is interrupted or closed."""
        self._check_open()
        self.counters.last_activity = time.monotonic()
        await self._push48(self._resampler.push(samples), self._epoch)

    def start_utterance(self) -> None:
        self._check_open()
        self._finish_input()
        self.jb.start_utterance(self._now())

    async def end_utterance(self) -> None:
        self._check_open()
        if not self.jb.receiving:
            return
        tail = self._resampler.flush()
        await self._push48(tail, self._epoch)
        self.jb.end_utterance(self._now())

    def check_queue(self, samples48: int) -> None:
        """Raises QueueFull unless ``samples48`` more samples (at AUDIO_RATE) fit in what
        is left of the session's queue. An upload asks before it is decoded."""
        self._check_open()
        if self._queued_samples + samples48 > self._max_queued:
            total_ms = 1000.0 * (self._queued_samples + samples48) / AUDIO_RATE
            raise QueueFull(
                f"session would hold {total_ms:.0f} ms of queued speech; "
                f"the limit is {1000.0 * self._max_queued / AUDIO_RATE:.0f} ms"
            )

    def enqueue_utterance(self, audio: np.ndarray | Pcm) -> float:
        """Queue a whole utterance behind the ones before it: samples already at
        AUDIO_RATE, or an upload's :class:`Pcm` (decoded and resampled as it plays).
        Returns the queued speech in ms. Raises QueueFull past the session's limit."""
        n48 = len(audio) if isinstance(audio, np.ndarray) else audio.samples48
        self.check_queue(n48)
        self._queued.append((audio, n48))
        self._queued_samples += n48
        self.counters.last_activity = time.monotonic()
        if self._feeder is None or self._feeder.done():
            self._feeder = asyncio.get_running_loop().create_task(
                self._feed_queued(), name=f"session-{self.id}-feeder")
            self._feeder.add_done_callback(_log_task_failure)
        return 1000.0 * self._queued_samples / AUDIO_RATE

    async def _feed_queued(self) -> None:
        step = AUDIO_RATE // 50  # 20 ms pieces, as a real-time source would send
        while self._queued and not self.closed:
            audio, n48 = self._queued[0]
            epoch = self._epoch
            self._finish_input()
            self.jb.start_utterance(self._now())
            played = True
            async with contextlib.aclosing(_blocks48(audio)) as blocks:
                async for block in blocks:
                    for start in range(0, len(block), step):
                        if not await self._push48(block[start : start + step], epoch):
                            played = False
                            break
                    if not played:
                        break
            if played:
                self.jb.end_utterance(self._now())
            if self._queued and epoch == self._epoch:
                self._queued.popleft()
                self._queued_samples -= n48

    async def _push48(self, samples48: np.ndarray, epoch: int) -> bool:
        if len(samples48) == 0:
            return True
        while not self.jb.has_room:
            self._room.clear()
            await self._room.wait()
            if self.closed or epoch != self._epoch:
                return False
        if self.closed or epoch != self._epoch:
            return False
        self.jb.push(samples48, self._now())
        if not self.jb.has_room:
            self._room.clear()
        return True

    def _finish_input(self) -> None:
        """An utterance left open by a client is closed before another one starts."""
        if self.jb.receiving:
            tail = self._resampler.flush()
            if len(tail):
                self.jb.push(tail, self._now())
            self.jb.end_utterance(self._now())

    # -- control ----------------------------------------------------------------------

    def interrupt(self) -> dict[str, Any]:
        """Barge-in: flush buffered and queued speech and queued frames at once."""
        self._check_open()
        now = self._now()
        current = self.jb.current_utterance
        position = self.jb.position_ms
        self._epoch += 1
        self._queued.clear()
        self._queued_samples = 0
        self._resampler = Resampler(self.spec.sample_rate)
        events = self.jb.flush(now)
        # Frames already made but not yet handed over are stale speech: drop them too,
        # and tell what they would have told, as an interruption at the last frame out.
        # So is the speech the sink still held: it was never heard.
        dropped = len(self._pending)
        unheard_ms = self.sink.interrupt()
        events = self._dropped_events(events, current, unheard_ms)
        self._pending.clear()
        self._room.set()
        self.counters.interrupts += 1
        self._state = INTERRUPTED
        for ev in events:
            self._handle(ev)
        return {"interrupted": bool(events), "was_playing": current is not None,
                "position_ms": round(position, 1), "dropped_frames": dropped}

    def _dropped_events(self, flushed: list[JitterEvent], current: int | None,
                        unheard_ms: float) -> list[JitterEvent]:
        """The playback events of frames dropped by an interrupt, then the buffer's own,
        with positions counting only speech that was played out: not the frames dropped
        here, nor the ``unheard_ms`` the sink dropped (the speech of ``current``, the
        utterance playing; with time-stretching on, output time stands in for source
        time there, off by at most its few percent)."""
        unplayed: dict[int, int] = {}
        carried: list[JitterEvent] = []
        for job in self._pending:
            if job.utterance is not None:
                # Positions count source samples, which a stretched frame is not.
                unplayed[job.utterance] = unplayed.get(job.utterance, 0) + job.source_samples
            carried.extend(job.events)
        out: list[JitterEvent] = []
        for ev in carried + flushed:
            if isinstance(ev, PlaybackFinished):
                lost = 1000.0 * unplayed.get(ev.utterance, 0) / AUDIO_RATE
                if ev.utterance == current:
                    lost += unheard_ms
                ev = PlaybackFinished(ev.utterance, max(0.0, ev.position_ms - lost), True,
                                      "interrupt")
            out.append(ev)
        return out

    # -- the clock --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """One frame: take its audio from the buffer and have its picture made."""
        if self.closed:
            return
        pull = self.jb.pull(now)
        if self.jb.has_room:
            self._room.set()
        # Playback events belong to the frame: they go out when it reaches the sink (a
        # model may hold it a few frames), so a client never hears "finished" early.
        frame_events = [ev for ev in pull.events
                        if isinstance(ev, PlaybackStarted | PlaybackFinished)]
        for ev in pull.events:
            if not isinstance(ev, PlaybackStarted | PlaybackFinished):
                self._handle(ev)
        if pull.utterance != self._utt:
            self._utt, self._utt_pos = pull.utterance, 0
        lookahead, complete = None, False
        if pull.speaking and pull.utterance is not None and self.renderer.lookahead_samples:
            lookahead, complete = self.jb.lookahead(pull.utterance,
                                                    self.renderer.lookahead_samples)
        job = FrameJob(
            index=self._frame_index, due=now, audio=pull.audio, speaking=pull.speaking,
            avatar=self.avatar, stream=self.id, utterance=pull.utterance,
            utt_pos=self._utt_pos, real_samples=pull.real_samples,
            source_samples=pull.source_samples, lookahead=lookahead,
            utt_complete=complete, on_done=self._job_done, events=frame_events,
        )
        self._utt_pos += pull.real_samples
        self._frame_index += 1
        if pull.real_samples:
            self.counters.played_ms += 1000.0 * pull.real_samples / AUDIO_RATE
        self._pending.append(job)
        self.renderer.submit(job)

    def _job_done(self, job: FrameJob) -> None:
        # Hand over every finished job at the head, in order.
        pending = self._pending
        if self.closed:
            return
        now = self._now()
        while pending and pending[0].video is not None:
            j = pending.popleft()
            assert j.video is not None
            for ev in j.events:
                self._handle(ev)
            chunk = MediaChunk(j.index, j.video, j.audio, j.speaking)
            self.sink.write(chunk)
            c = self.counters
            c.frames_out += 1
            c.speaking_frames += j.speaking
            c.degraded_frames += j.degraded
            late = now - j.due
            if late > c.max_lateness_s:
                c.max_lateness_s = late
            if late > self.frame_s:
                c.late_frames += 1
            if self._on_frame is not None:
                self._on_frame(late, chunk)

    # -- events -----------------------------------------------------------------------

    def subscribe(self, maxsize: int = 256) -> asyncio.Queue[SessionEvent | None]:
        """A new queue of this session's events (:mod:`rapido.pipeline.events`); ``None``
        after the last one (the session closed, or the reader fell ``maxsize`` behind)."""
        q: asyncio.Queue[SessionEvent | None] = asyncio.Queue(maxsize=maxsize)
        self.add_listener(q)
        return q

    def add_listener(self, q: Listener) -> None:
        """Like :meth:`subscribe`, into the caller's own bounded queue (one that may also
        carry the caller's own messages)."""
        self._listeners.add(q)

    def unsubscribe(self, q: Listener) -> None:
        self._listeners.discard(q)

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def emit(self, event: SessionEvent) -> None:
        for q in list(self._listeners):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                # A client that stops reading its events is cut off rather than letting
                # its queue grow without bound; the None tells its writer to close.
                self._listeners.discard(q)
                _drain_and_close(q)

    def _handle(self, ev: JitterEvent) -> None:
        if isinstance(ev, PlaybackStarted):
            self._state = SPEAKING
            self.emit(ev)
        elif isinstance(ev, PlaybackFinished):
            if self._state == SPEAKING:
                self._state = INTERRUPTED if ev.interrupted else IDLE
            # Listeners are told times to 0.1 ms.
            self.emit(PlaybackFinished(ev.utterance, round(ev.position_ms, 1),
                                       ev.interrupted, ev.reason))
        elif isinstance(ev, Underrun):
            self.emit(Underrun(ev.utterance, round(ev.position_ms, 1)))
        elif isinstance(ev, Refill):
            self.emit(Refill(round(ev.buffered_ms, 1), round(ev.target_ms, 1)))
        if self._on_event is not None:
            self._on_event(self, ev)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.sink.start()

    async def aclose(self, reason: str = "closed") -> None:
        if self.closed:
            return
        if self.jb.current_utterance is not None or self.jb.pending_utterances:
            for ev in self.jb.flush(self._now()):
                self._handle(ev)
        self._state = CLOSED
        self.close_reason = reason
        self._epoch += 1
        self._room.set()  # wake any feed() waiting on back-pressure
        self._pending.clear()
        self._queued.clear()
        self._queued_samples = 0
        for q in list(self._listeners):
            try:
                q.put_nowait(Closed(reason))
            except asyncio.QueueFull:
                pass
            _close_queue(q)
        self._listeners.clear()
        await cancel_and_wait([self._feeder])
        self.renderer.close_stream(self.id)
        try:
            await self.sink.aclose()
        except Exception:
            log.exception("session %s: sink failed to close", self.id)

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosed(f"session {self.id} is closed")

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()


async def _blocks48(audio: np.ndarray | Pcm) -> AsyncGenerator[np.ndarray]:
    """An utterance at AUDIO_RATE, a block at a time. An upload's blocks (<= 1 s of
    input each) are decoded and resampled in the default executor, off the event loop;
    only one block of it is in memory at AUDIO_RATE at a time."""
    if isinstance(audio, np.ndarray):
        yield audio
        return
    blocks = audio.blocks48()
    loop = asyncio.get_running_loop()
    while (block := await loop.run_in_executor(None, next, blocks, None)) is not None:
        yield block


def _close_queue(q: Listener) -> None:
    try:
        q.put_nowait(None)
    except asyncio.QueueFull:
        _drain_and_close(q)


def _drain_and_close(q: Listener) -> None:
    while not q.empty():
        q.get_nowait()
    q.put_nowait(None)


def _log_task_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
