"""Engine: the node's streams, their admission, and the one clock that drives them all.

One task ticks every frame interval and advances every stream in a single pass: with a
hundred streams that is one wake-up per 40 ms instead of a hundred, and it gives the
model layer one place to gather a batch. The schedule is absolute (``t0 + k * frame``)
so it never drifts; a loop stall is caught up frame by frame.

The engine knows no concrete part: the renderer and avatars come from a loader, the
sinks from providers registered by name, both built from the configuration by
:mod:`rapido.wiring`.

Why more than the ~250 lines first aimed at: draining, the idle sweep of unwatched sessions,
the lesson lookup for the cluster and the frame hook came later and each needs the
registry of sessions and the clock that live here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rapido.aio import cancel_and_wait
from rapido.cluster.placement import make_session_id
from rapido.metrics import Metrics
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.errors import AdmissionError, SinkUnavailable, UnknownAvatar
from rapido.pipeline.jitter import JitterConfig, JitterEvent, PlaybackFinished, Underrun
from rapido.pipeline.media import AUDIO_RATE, MediaChunk
from rapido.pipeline.provider import SinkProvider
from rapido.pipeline.quality import NodeLoad
from rapido.pipeline.render import FrameRenderer, IdleRenderer
from rapido.pipeline.session import SessionSpec, StreamSession
from rapido.pipeline.sinks.base import Adaptive

__all__ = ["AdmissionError", "Engine", "EngineSettings", "RenderSetup", "SinkUnavailable",
           "UnknownAvatar"]

log = logging.getLogger(__name__)

#: A stall longer than this many frames is not caught up: the clock jumps ahead and the
#: skipped ticks are counted as late (audio is not lost, it plays later).
MAX_CATCH_UP_FRAMES = 5


@dataclass(frozen=True)
class EngineSettings:
    """The engine's settings; their defaults are the Config's (rapido.wiring fills them)."""

    fps: int
    max_streams: int
    max_queued_audio_s: float
    session_idle_timeout_s: float  # 0: never
    jitter: JitterConfig
    node_id: str
    cores: int  # the CPU cores the node may use (its load is a share of them)


@dataclass
class RenderSetup:
    """What the node renders with: the renderer and the avatars sessions may ask for."""

    renderer: FrameRenderer
    avatars: Mapping[str, Avatar]


#: Opens the renderer and avatars (slow: drawing, model builds) given the callback for
#: the renderer's quality; called once by :meth:`Engine.start`.
RenderLoader = Callable[[Callable[[float], None]], Awaitable[RenderSetup]]
#: Sees every frame handed to a sink: (session id, lateness in s, the chunk: picture,
#: audio, speaking). Called on the loop for every frame: it must be cheap.
FrameHook = Callable[[str, float, MediaChunk], None]
#: Sees every session that was created (``True``) and that closed (``False``).
SessionHook = Callable[[StreamSession, bool], None]


class Engine:
    def __init__(self, settings: EngineSettings, metrics: Metrics, *,
                 sinks: Mapping[str, SinkProvider], load: RenderLoader,
                 on_frame: FrameHook | None = None,
                 on_session: SessionHook | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.node_id = settings.node_id
        self.renderer: FrameRenderer = IdleRenderer()
        self.sessions: dict[str, StreamSession] = {}
        # The sinks that adapt (publishers), found once per session, not once a second.
        self._adaptive: dict[str, Adaptive] = {}
        self._sinks = dict(sinks)
        self._load_render = load
        self._frame_hook = on_frame
        self._session_hook = on_session
        self._by_lesson: dict[str, str] = {}
        self._avatars: dict[str, Avatar] = {}
        self._clock: asyncio.Task[None] | None = None
        self._creating: dict[str, asyncio.Future[StreamSession]] = {}
        self._closing: set[asyncio.Task[bool]] = set()
        self.draining = False
        self.ready = False
        self.ticks = 0
        self.late_ticks = 0
        self._frame_s = 1.0 / settings.fps
        # Adaptive quality: the renderer's share of video_quality_score, and the node
        # load sampled once a second for the publishing sinks.
        self._render_quality = 1.0
        self._publish_score = 1.0  # the publishers' mean, refreshed once a second
        self.load = 0.0
        self._node_load = NodeLoad(settings.cores, time.monotonic(), time.process_time())

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        setup = await self._load_render(self._on_render_quality)
        self.renderer = setup.renderer
        self._avatars = dict(setup.avatars)
        loop = asyncio.get_running_loop()
        self._clock = loop.create_task(self._run_clock(), name="engine-clock")
        self._clock.add_done_callback(self._clock_done)
        self.ready = True

    async def aclose(self) -> None:
        self.ready = False
        await self.close_all("shutdown")
        await self.renderer.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._clock is not None:
            await cancel_and_wait([self._clock])
            self._clock = None
        # Last, in reverse order of registration: providers' shared encoders finish
        # the lanes of sinks whose close is still running elsewhere (a DELETE).
        for provider in reversed(list(self._sinks.values())):
            await provider.aclose()

    def stop_admitting(self) -> None:
        """From now on creates are refused (``draining``) and ``/ready`` says 503; the
        sessions it has play on. Idempotent; :meth:`drain` does it first."""
        self.draining = True

    async def close_all(self, reason: str) -> None:
        """Close every session with ``reason`` (their listeners get ``closed``)."""
        await asyncio.gather(*(self.close_session(sid, reason) for sid in list(self.sessions)))

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting; wait up to ``timeout_s`` for speech in flight to finish.
        Returns True if every session went quiet in time."""
        self.stop_admitting()
        deadline = time.monotonic() + timeout_s
        while any(s.busy for s in self.sessions.values()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self._frame_s)
        return True

    def _clock_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("engine clock died; no stream advances", exc_info=task.exception())
            self.ready = False

    # -- sessions -----------------------------------------------------------------------

    @property
    def avatars(self) -> list[str]:
        return sorted(self._avatars)

    def provider(self, sink: str) -> SinkProvider:
        """The provider registered for sink name ``sink`` (KeyError if none)."""
        return self._sinks[sink]

    def find_lesson(self, lesson_id: str) -> StreamSession | None:
        sid = self._by_lesson.get(lesson_id)
        return self.sessions.get(sid) if sid else None

    async def create_session(self, spec: SessionSpec) -> tuple[StreamSession, bool]:
        """Returns (session, created). Idempotent per lesson: a lesson with a live session
        gets that session back, even when two creates race."""
        existing = self.find_lesson(spec.lesson_id)
        if existing is not None:
            return existing, False
        inflight = self._creating.get(spec.lesson_id)
        if inflight is not None:
            return await asyncio.shield(inflight), False
        if self.draining:
            self.metrics.sessions_rejected.labels("draining").inc()
            raise AdmissionError("draining", "this node is shutting down; try another node")
        limit = self.settings.max_streams
        if len(self.sessions) + len(self._creating) >= limit:
            self.metrics.sessions_rejected.labels("at_capacity").inc()
            raise AdmissionError("at_capacity", f"this node is at its limit of {limit} streams")
        avatar = self._avatars.get(spec.avatar)
        if avatar is None:
            raise UnknownAvatar(
                f"avatar {spec.avatar!r} is not known; known: {', '.join(self.avatars)}")
        provider = self._sinks.get(spec.sink)
        if provider is None:
            raise SinkUnavailable(f"this node has no {spec.sink!r} sink; it has "
                                  f"{', '.join(self._sinks)}")
        fut: asyncio.Future[StreamSession] = asyncio.get_running_loop().create_future()
        self._creating[spec.lesson_id] = fut
        try:
            session = self._build(spec, avatar, provider)
            try:
                await session.start()
                provider.bind(session)
            except BaseException:
                # What the provider kept and the sink opened must not outlive the
                # refusal (a region slot, an encoder, a connect task).
                await self._discard(session, provider)
                raise
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: racing creates see it, nobody else has to
            raise
        finally:
            self._creating.pop(spec.lesson_id, None)
        self.sessions[session.id] = session
        self._by_lesson[spec.lesson_id] = session.id
        if isinstance(session.sink, Adaptive):
            self._adaptive[session.id] = session.sink
        fut.set_result(session)
        self.metrics.sessions_created.inc()
        self.metrics.concurrent_streams.set(len(self.sessions))
        self._notify(session, True)
        log.info("session %s created for lesson %s (sink %s)", session.id, spec.lesson_id,
                 spec.sink)
        return session, True

    def _build(self, spec: SessionSpec, avatar: Avatar,
               provider: SinkProvider) -> StreamSession:
        sid = self.new_session_id()
        s = self.settings

        def on_frame(lateness_s: float, chunk: MediaChunk) -> None:
            self._frame_out(sid, lateness_s, chunk)

        return StreamSession(
            sid, spec, avatar=avatar, sink=provider.open(spec, sid, self.node_id),
            renderer=self.renderer, jitter=s.jitter, fps=s.fps,
            max_queued_s=s.max_queued_audio_s, node_id=self.node_id,
            on_event=self._on_event, on_frame=on_frame,
        )

    @staticmethod
    async def _discard(session: StreamSession, provider: SinkProvider) -> None:
        try:
            await provider.release(session)
            await session.aclose("error")
            provider.closed(session)
        except Exception:
            log.exception("session %s: cleanup after a failed create failed", session.id)

    def new_session_id(self) -> str:
        """``{node_id}.{32 hex}``: the id names its node, so any node of a cluster routes
        the session's URLs without a lookup; plain hex when the node id cannot be part of
        one (a long host name: such a node serves alone)."""
        random_hex = secrets.token_hex(16)
        try:
            return make_session_id(self.node_id, random_hex)
        except ValueError:
            return random_hex

    def describe(self, session: StreamSession) -> dict[str, Any]:
        """What the session's sink provider adds to its JSON."""
        provider = self._sinks.get(session.spec.sink)
        return provider.describe(session) if provider is not None else {}

    async def close_session(self, session_id: str, reason: str = "closed") -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        if self._by_lesson.get(session.lesson_id) == session_id:
            del self._by_lesson[session.lesson_id]
        self._adaptive.pop(session_id, None)
        provider = self._sinks.get(session.spec.sink)
        try:
            if provider is not None:
                await provider.release(session)
        finally:
            await session.aclose(reason)
            if provider is not None:
                provider.closed(session)
        self._account_audio([session])
        self.metrics.concurrent_streams.set(len(self.sessions))
        self.metrics.sessions_closed.labels(reason).inc()
        self._notify(session, False)
        log.info("session %s closed (%s)", session_id, reason)
        return True

    def _notify(self, session: StreamSession, created: bool) -> None:
        if self._session_hook is not None:
            try:
                self._session_hook(session, created)
            except Exception:
                log.exception("session %s: the session hook failed", session.id)

    # -- events from sessions -----------------------------------------------------------

    def _on_event(self, session: StreamSession, ev: JitterEvent) -> None:
        if isinstance(ev, Underrun):
            self.metrics.underruns.inc()
        elif isinstance(ev, PlaybackFinished):
            self.metrics.utterances.labels(ev.reason).inc()

    def _frame_out(self, session_id: str, lateness_s: float, chunk: MediaChunk) -> None:
        self.metrics.frame_latency.observe(max(0.0, lateness_s))
        late = lateness_s > self._frame_s
        self._node_load.frame(late)
        if late:
            self.metrics.late_frames.inc()
        if self._frame_hook is not None:
            self._frame_hook(session_id, lateness_s, chunk)

    # -- adaptive quality -----------------------------------------------------------------

    def _on_render_quality(self, q: float) -> None:
        # Called after every batch: only a store and a gauge set, no walk of sessions.
        if q != self._render_quality:
            self._render_quality = q
            self.metrics.video_quality.set(q * self._publish_score)

    def publish_quality(self) -> float:
        """video_quality_score = the renderer's quality x the publishers' mean score."""
        scores = [sink.quality_score() for sink in self._adaptive.values()]
        self._publish_score = sum(scores) / len(scores) if scores else 1.0
        score = self._render_quality * self._publish_score
        self.metrics.video_quality.set(score)
        return score

    def _adapt(self) -> None:
        self.load = load = self._node_load.sample(time.monotonic(), time.process_time())
        now = time.monotonic()
        for sid, sink in list(self._adaptive.items()):
            try:
                sink.adapt(load, now)
            except Exception:
                log.exception("session %s: adaptive quality failed", sid)
        self.publish_quality()

    # -- the clock ----------------------------------------------------------------------

    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        frame_s = self._frame_s
        next_t = loop.time()
        m = self.metrics
        frames_idle = m.frames.labels("idle")
        frames_speaking = m.frames.labels("speaking")
        idle_timeout = self.settings.session_idle_timeout_s
        last_sweep = time.monotonic()
        while True:
            delay = next_t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                # Catching up after a stall. Audio that arrived meanwhile is still in the
                # sockets (or in its feeder's timer): let it in before this frame is
                # taken, or the catch-up frames drain the buffers back to back and every
                # stream underruns on audio that was on time.
                await asyncio.sleep(0.001)
            now = loop.time()
            behind = int((now - next_t) / frame_s)
            if behind > MAX_CATCH_UP_FRAMES:
                # The loop was stalled far too long to catch up: skip ahead. No audio is
                # lost; each stream's speech simply plays that much later.
                self.late_ticks += behind
                next_t += behind * frame_s
            t_cpu = time.perf_counter()
            speaking = 0
            sessions = list(self.sessions.values())
            for s in sessions:
                try:
                    s.tick(next_t)
                except Exception:
                    # A fault in one stream ends that stream alone.
                    log.exception("session %s failed in its tick; closing it", s.id)
                    m.session_errors.labels("tick").inc()
                    self._close_later(s.id, "error")
                    continue
                speaking += s.speaking
            self.ticks += 1
            frames_speaking.inc(speaking)
            frames_idle.inc(len(sessions) - speaking)
            m.speaking_streams.set(speaking)
            m.clock_tick.observe(time.perf_counter() - t_cpu)
            next_t += frame_s
            if time.monotonic() - last_sweep > 1.0:
                last_sweep = time.monotonic()
                self._account_audio()
                self._adapt()
                if idle_timeout:
                    self._close_idle(idle_timeout)

    def _account_audio(self, sessions: Iterable[StreamSession] | None = None) -> None:
        """Fold the streams' audio counters into the node's, once a second (not per
        frame: this is bookkeeping, not the hot path) and when a stream closes."""
        received = concealed = removed = inserted = 0
        for s in self.sessions.values() if sessions is None else sessions:
            js, c = s.jb.stats, s.counters
            received += js.received_samples - c.reported_received
            concealed += js.concealed_samples - c.reported_concealed
            removed += js.removed_samples_for_acceleration - c.reported_removed
            inserted += js.inserted_samples_for_deceleration - c.reported_inserted
            c.reported_received = js.received_samples
            c.reported_concealed = js.concealed_samples
            c.reported_removed = js.removed_samples_for_acceleration
            c.reported_inserted = js.inserted_samples_for_deceleration
        self.metrics.audio_in.inc(received / AUDIO_RATE)
        self.metrics.concealed.inc(concealed / AUDIO_RATE)
        self.metrics.accelerated.inc(removed / AUDIO_RATE)
        self.metrics.decelerated.inc(inserted / AUDIO_RATE)

    def _close_later(self, session_id: str, reason: str) -> None:
        """Close a session from the clock without holding the clock up."""
        task = asyncio.get_running_loop().create_task(
            self.close_session(session_id, reason), name=f"close-{session_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _close_idle(self, timeout_s: float) -> None:
        """Close sessions with no speech and no listener (an event subscriber such as a
        WebSocket, or someone watching the sink: WHEP viewers, LiveKit subscribers) for
        ``timeout_s``. A listener counts as activity, so a session whose last viewer
        left gets the whole timeout again."""
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if s.busy:
                continue
            if s.listeners or _audience(s):
                s.counters.last_activity = now
            elif now - s.counters.last_activity > timeout_s:
                self._close_later(s.id, "idle_timeout")

    # -- reporting ----------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "streams": len(self.sessions),
            "speaking": sum(s.speaking for s in self.sessions.values()),
            "max_streams": self.settings.max_streams,
            "draining": self.draining,
            "renderer": self.renderer.info(),
            "ticks": self.ticks,
            "late_ticks": self.late_ticks,
            "load": round(self.load, 3),
        }


def _audience(session: StreamSession) -> int:
    try:
        return session.sink.audience()
    except Exception:
        log.exception("session %s: its sink's audience failed", session.id)
        return 0
