"""Engine: the node's streams and the one clock that drives them all.

One task ticks every frame interval and advances every stream in a single pass: with a
hundred streams that is one wake-up per 40 ms instead of a hundred, and it gives the
model layer one place to gather a batch. The schedule is absolute (``t0 + k * frame``)
so it never drifts; a loop stall is caught up frame by frame.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from rapido.aio import cancel_and_wait
from rapido.config import Config, load_regions
from rapido.gpu.backends import ModelBackend, make_backend
from rapido.gpu.compositor import Blend
from rapido.gpu.lipsync import LipSyncRenderer
from rapido.gpu.portrait import default_avatar
from rapido.gpu.registry import default_model_dir, resolve_model
from rapido.livekit.bridge import AgentBridge
from rapido.livekit.regions import select_region
from rapido.livekit.sink import LiveKitSink
from rapido.livekit.tokens import publisher_identity, publisher_token, room_name, viewer_token
from rapido.metrics import Metrics
from rapido.pipeline.avatar import Avatar, load_avatar
from rapido.pipeline.jitter import JitterEvent, PlaybackFinished, PlaybackStarted, Underrun
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.render import FrameRenderer, IdleRenderer
from rapido.pipeline.session import SessionSpec, StreamSession
from rapido.pipeline.sinks.base import Sink
from rapido.pipeline.sinks.null import NullSink
from rapido.pipeline.sinks.pool import EncoderPool
from rapido.pipeline.sinks.recorder import RecorderSink
from rapido.webrtc import WebRtcSink

log = logging.getLogger(__name__)

#: A stall longer than this many frames is not caught up: the clock jumps ahead and the
#: skipped ticks are counted as late (audio is not lost, it plays later).
MAX_CATCH_UP_FRAMES = 5


class AdmissionError(RuntimeError):
    def __init__(self, code: str, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class UnknownAvatar(LookupError):
    pass


class SinkUnavailable(ValueError):
    """The session asks for a sink this node is not set up to provide."""


class Engine:
    def __init__(self, config: Config, metrics: Metrics, *,
                 renderer: FrameRenderer | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.renderer: FrameRenderer = renderer or IdleRenderer()
        self._own_renderer = renderer is None
        self.node_id = config.node_id
        self.sessions: dict[str, StreamSession] = {}
        self._by_lesson: dict[str, str] = {}
        self._avatars: dict[str, Avatar] = {}
        self._clock: asyncio.Task[None] | None = None
        self._creating: dict[str, asyncio.Future[StreamSession]] = {}
        self._closing: set[asyncio.Task[bool]] = set()
        self._regions = load_regions(config)
        self._session_region: dict[str, str] = {}  # LiveKit sessions: their region
        self._bridges: dict[str, AgentBridge] = {}  # sessions serving a LiveKit agent
        self.draining = False
        self.ready = False
        self.ticks = 0
        self.late_ticks = 0
        self._frame_s = 1.0 / config.fps
        # Adaptive quality: the renderer's share of video_quality_score, and the node
        # load sampled once a second for the publishing sinks.
        self._render_quality = 1.0
        self._publish_score = 1.0  # the publishers' mean, refreshed once a second
        self.load = 0.0
        self._frames_seen = 0
        self._frames_late = 0
        self._load_mark = (time.monotonic(), time.process_time(), 0, 0)
        self._cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else (os.cpu_count() or 1))
        # Every encoding sink's work runs on these few threads (see sinks/pool.py).
        # Recorders get their own: they write to disk, and a stalled disk must not hold
        # up the live streams' encoders.
        self.encoders = EncoderPool(config.encoder_threads or self._cores)
        self.recorders = EncoderPool(config.encoder_threads or self._cores,
                                     name="rapido-record")

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        # Drawing the avatar takes a moment: do it before /ready says yes, off the loop.
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._avatars["default"] = await loop.run_in_executor(
            None, default_avatar, cfg.width, cfg.height, cfg.fps)
        self._avatars.update(await loop.run_in_executor(None, self._load_avatars))
        if self._own_renderer and cfg.model != "none":
            # Building a model (first use) and opening a session take seconds: off the loop.
            backend, blend, name = await loop.run_in_executor(None, self._open_model)
            self.renderer = LipSyncRenderer(
                backend, blend=blend, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                # Several batches at once only where the backend allows it.
                batch_workers=cfg.batch_workers if getattr(backend, "thread_safe", False)
                else 1,
                budget_ms=cfg.frame_budget_ms, batcher_metrics=self.metrics.batcher,
                on_quality=self._on_render_quality, model_name=name)
            # Compositors are per avatar and take a moment: have them ready before /ready.
            for avatar in self._avatars.values():
                await loop.run_in_executor(None, self.renderer.compositor, avatar)
            log.info("lip sync: model %s on %s", name, backend.name)
        self._clock = loop.create_task(self._run_clock(), name="engine-clock")
        self._clock.add_done_callback(self._clock_done)
        self.ready = True

    def _open_model(self) -> tuple[ModelBackend, Blend, str]:
        cfg = self.config
        model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir()
        manifest = resolve_model(cfg.model, model_dir)
        backend = make_backend(
            manifest, kind=cfg.backend, device=cfg.device, dtype=cfg.dtype,
            intra_op_threads=cfg.intra_op_threads, max_batch=cfg.max_batch,
            trt_cache_dir=Path(cfg.trt_cache_dir) if cfg.trt_cache_dir
            else model_dir / "trt-cache")
        # The first runs of a session allocate and pick kernels (and on a GPU build
        # engines or capture graphs): do it now, not on the first speaking frames.
        s = backend.crop_size
        for size in sorted({b for b in backend.preferred_batch_sizes if b <= cfg.max_batch}
                           | {1}):
            backend.run(np.full((size, 1, 80, 16), -4.0, np.float32),
                        np.zeros((size, 6, s, s), np.float32))
        # The built-in renderer only redraws the mouth; Wav2Lip-style models the whole
        # lower half of the face.
        blend: Blend = "mouth" if manifest.name == "rapido-lite" else "lower_half"
        return backend, blend, manifest.name

    def _load_avatars(self) -> dict[str, Avatar]:
        root = Path(self.config.avatars_dir)
        found: dict[str, Avatar] = {}
        if not root.is_dir():
            return found
        for path in sorted(root.glob("*.npz")):
            try:
                found[path.stem] = load_avatar(path)
            except (OSError, ValueError) as exc:
                log.error("avatar %s is unusable and was skipped: %s", path, exc)
        return found

    async def aclose(self) -> None:
        self.ready = False
        await asyncio.gather(*(self.close_session(sid, "shutdown")
                               for sid in list(self.sessions)))
        await self.renderer.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._clock is not None:
            await cancel_and_wait([self._clock])
            self._clock = None
        # Last: sinks whose close is still running elsewhere (a DELETE) finish their
        # lanes inside close(), which runs what is left before it returns.
        await asyncio.to_thread(self.encoders.close)
        await asyncio.to_thread(self.recorders.close)

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting; wait up to ``timeout_s`` for speech in flight to finish.
        Returns True if every session went quiet in time."""
        self.draining = True
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
        if len(self.sessions) + len(self._creating) >= self.config.max_streams:
            self.metrics.sessions_rejected.labels("at_capacity").inc()
            raise AdmissionError(
                "at_capacity",
                f"this node is at its limit of {self.config.max_streams} streams")
        avatar = self._avatars.get(spec.avatar)
        if avatar is None:
            raise UnknownAvatar(
                f"avatar {spec.avatar!r} is not known; known: {', '.join(self.avatars)}")
        fut: asyncio.Future[StreamSession] = asyncio.get_running_loop().create_future()
        self._creating[spec.lesson_id] = fut
        try:
            session = self._build(spec, avatar)
            await session.start()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: racing creates see it, nobody else has to
            raise
        finally:
            self._creating.pop(spec.lesson_id, None)
        if spec.agent_identity is not None and isinstance(session.sink, LiveKitSink):
            bridge = AgentBridge(session, agent_identity=spec.agent_identity)
            session.sink.on_room = bridge.attach
            self._bridges[session.id] = bridge
        self.sessions[session.id] = session
        self._by_lesson[spec.lesson_id] = session.id
        fut.set_result(session)
        self.metrics.sessions_created.inc()
        self.metrics.concurrent_streams.set(len(self.sessions))
        log.info("session %s created for lesson %s (sink %s)", session.id, spec.lesson_id,
                 spec.sink)
        return session, True

    def _build(self, spec: SessionSpec, avatar: Avatar) -> StreamSession:
        sid = uuid.uuid4().hex
        return StreamSession(
            sid, spec, avatar=avatar, sink=self._make_sink(spec, sid),
            renderer=self.renderer, jitter=self.config.jitter(), fps=self.config.fps,
            max_queued_s=self.config.max_queued_audio_s, node_id=self.node_id,
            on_event=self._on_event, on_frame=self._on_frame,
        )

    def _make_sink(self, spec: SessionSpec, sid: str) -> Sink:
        cfg = self.config
        if spec.sink == "record":
            path = Path(cfg.recordings_dir) / f"{spec.lesson_id}_{sid}.mp4"
            return RecorderSink(path, width=cfg.width, height=cfg.height, fps=cfg.fps,
                                preset=cfg.record_preset, crf=cfg.record_crf,
                                # One thread per encode: the pool's threads are the
                                # parallelism, across streams rather than inside one.
                                threads=1, pool=self.recorders)
        if spec.sink == "webrtc":
            return WebRtcSink(width=cfg.width, height=cfg.height, fps=cfg.fps,
                              video_bitrate=cfg.webrtc_video_bitrate,
                              min_bitrate=cfg.webrtc_min_bitrate, min_fps=cfg.min_fps,
                              warm=cfg.webrtc_warm_encoders, pool=self.encoders,
                              warm_codec=f"video/{cfg.webrtc_warm_codec}",
                              x264_preset=cfg.webrtc_x264_preset,
                              threads=cfg.webrtc_encoder_threads)
        if spec.sink == "livekit":
            return self._livekit_sink(spec, sid)
        return NullSink()

    def _livekit_sink(self, spec: SessionSpec, sid: str) -> Sink:
        cfg = self.config
        if not (cfg.livekit_api_key and cfg.livekit_api_secret) or not self._regions:
            raise SinkUnavailable("this node does not publish to LiveKit: it has no LiveKit "
                                  "credentials (livekit_api_key / livekit_api_secret) or no "
                                  "region (livekit_url / livekit_regions_file)")
        load: dict[str, int] = {}
        for name in self._session_region.values():
            load[name] = load.get(name, 0) + 1
        region = select_region(self._regions, spec.user_location, load, {})
        if region is None:
            raise AdmissionError("no_livekit_region",
                                 "no LiveKit region is configured or has room for another "
                                 "stream", retry_after_s=30)
        room = spec.room or room_name(spec.lesson_id)
        identity = publisher_identity(self.node_id or "node", sid)
        agent = spec.agent_identity
        key, secret, ttl = cfg.livekit_api_key, cfg.livekit_api_secret, cfg.livekit_token_ttl_s
        self._session_region[sid] = region.name
        errors = self.metrics.session_errors.labels("livekit_degraded")

        def on_state(state: str, reason: str | None) -> None:
            if state == "degraded":
                errors.inc()
                log.warning("session %s: LiveKit %s degraded: %s", sid, region.name, reason)

        return LiveKitSink(
            url=region.url,
            token_factory=lambda: publisher_token(key, secret, room=room, identity=identity,
                                                  ttl_s=ttl, agent_identity=agent),
            width=cfg.width, height=cfg.height, fps=cfg.fps,
            queue_size_ms=cfg.livekit_queue_size_ms, video_codec=cfg.livekit_video_codec,
            max_bitrate=cfg.livekit_max_bitrate, min_bitrate=cfg.livekit_min_bitrate,
            simulcast=cfg.livekit_simulcast, min_fps=cfg.min_fps,
            on_connect=self.metrics.livekit_connection.observe, on_state=on_state)

    def livekit_json(self, s: StreamSession) -> dict[str, Any]:
        """Where a LiveKit session publishes, and a subscribe-only token for its room."""
        name = self._session_region.get(s.id)
        region = next((r for r in self._regions if r.name == name), None)
        if region is None:
            return {}
        room = s.spec.room or room_name(s.lesson_id)
        cfg = self.config
        return {"region": region.name, "livekit_url": region.url, "room_name": room,
                "viewer_token": viewer_token(cfg.livekit_api_key, cfg.livekit_api_secret,
                                             room=room, identity=f"viewer-{s.id}",
                                             ttl_s=cfg.livekit_token_ttl_s)}

    async def close_session(self, session_id: str, reason: str = "closed") -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        if self._by_lesson.get(session.lesson_id) == session_id:
            del self._by_lesson[session.lesson_id]
        bridge = self._bridges.pop(session_id, None)
        if bridge is not None:
            await bridge.aclose()
        await session.aclose(reason)
        self._session_region.pop(session_id, None)
        self._account_audio([session])
        self.metrics.concurrent_streams.set(len(self.sessions))
        log.info("session %s closed (%s)", session_id, reason)
        return True

    # -- events from sessions -----------------------------------------------------------

    def _on_event(self, session: StreamSession, ev: JitterEvent) -> None:
        m = self.metrics
        if isinstance(ev, Underrun):
            m.underruns.inc()
        elif isinstance(ev, PlaybackFinished):
            m.utterances.labels(ev.reason).inc()
        elif isinstance(ev, PlaybackStarted):
            pass

    def _on_frame(self, lateness_s: float, speaking: bool) -> None:
        self.metrics.frame_latency.observe(max(0.0, lateness_s))
        self._frames_seen += 1
        if lateness_s > self._frame_s:
            self._frames_late += 1
            self.metrics.late_frames.inc()

    # -- adaptive quality -----------------------------------------------------------------

    def _on_render_quality(self, q: float) -> None:
        # Called after every batch: only a store and a gauge set, no walk of sessions.
        if q != self._render_quality:
            self._render_quality = q
            self.metrics.video_quality.set(q * self._publish_score)

    def _publish_quality(self) -> None:
        """video_quality_score = the renderer's quality x the publishers' mean score."""
        scores = [sink.quality_score() for s in self.sessions.values()
                  if hasattr(sink := s.sink, "quality_score")]
        self._publish_score = sum(scores) / len(scores) if scores else 1.0
        self.metrics.video_quality.set(self._render_quality * self._publish_score)

    def _sample_load(self) -> float:
        """The node's load since the last sample: the share of its cores this process
        used, or the share of frames that left late x 20 if more (5 % late reads as a
        node at its limit, whatever the CPU says; one late frame of one stream's 25 a
        second is a hiccup, 0.8, which holds but does not degrade)."""
        wall, cpu, seen, late = time.monotonic(), time.process_time(), \
            self._frames_seen, self._frames_late
        w0, c0, s0, l0 = self._load_mark
        self._load_mark = (wall, cpu, seen, late)
        util = (cpu - c0) / max(1e-3, wall - w0) / self._cores
        late_share = (late - l0) / (seen - s0) if seen > s0 else 0.0
        return max(0.0, util, min(2.0, late_share * 20))

    def _adapt(self) -> None:
        self.load = load = self._sample_load()
        now = time.monotonic()
        for s in list(self.sessions.values()):
            adapt = getattr(s.sink, "adapt", None)
            if adapt is not None:
                try:
                    adapt(load, now)
                except Exception:
                    log.exception("session %s: adaptive quality failed", s.id)
        self._publish_quality()

    # -- the clock ----------------------------------------------------------------------

    async def _run_clock(self) -> None:
        loop = asyncio.get_running_loop()
        frame_s = self._frame_s
        next_t = loop.time()
        m = self.metrics
        frames_idle = m.frames.labels("idle")
        frames_speaking = m.frames.labels("speaking")
        idle_timeout = self.config.session_idle_timeout_s
        last_sweep = time.monotonic()
        while True:
            delay = next_t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
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
        received = concealed = 0
        for s in self.sessions.values() if sessions is None else sessions:
            js = s.jb.stats
            received += js.received_samples - s.counters.reported_received
            concealed += js.concealed_samples - s.counters.reported_concealed
            s.counters.reported_received = js.received_samples
            s.counters.reported_concealed = js.concealed_samples
        self.metrics.audio_in.inc(received / AUDIO_RATE)
        self.metrics.concealed.inc(concealed / AUDIO_RATE)

    def _close_later(self, session_id: str, reason: str) -> None:
        """Close a session from the clock without holding the clock up."""
        task = asyncio.get_running_loop().create_task(
            self.close_session(session_id, reason), name=f"close-{session_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _close_idle(self, timeout_s: float) -> None:
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if not s.busy and not s.listeners and now - s.counters.last_activity > timeout_s:
                self._close_later(s.id, "idle_timeout")

    # -- reporting ----------------------------------------------------------------------

    def session_json(self, s: StreamSession, base_url: str) -> dict[str, Any]:
        ws_base = base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        return {
            "session_id": s.id,
            "lesson_id": s.lesson_id,
            "user_id": s.spec.user_id,
            "user_location": s.spec.user_location,
            "room_name": s.spec.room or f"lesson_{s.lesson_id}",
            "agent_identity": s.spec.agent_identity,
            "state": s.state,
            "node": self.node_id,
            "region": self.config.region,
            "avatar": s.spec.avatar,
            "sink": s.spec.sink,
            "sample_rate": s.spec.sample_rate,
            "audio_rate": AUDIO_RATE,
            "fps": self.config.fps,
            "width": self.config.width,
            "height": self.config.height,
            "ws_url": f"{ws_base}/ws/sessions/{s.id}",
            "audio_url": f"{base_url}/api/sessions/{s.id}/audio",
            "created_at": _iso(s.created_at),
            "stats": s.stats(),
            **(self.livekit_json(s) if s.spec.sink == "livekit" else {}),
        }

    def summary(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "streams": len(self.sessions),
            "speaking": sum(s.speaking for s in self.sessions.values()),
            "max_streams": self.config.max_streams,
            "draining": self.draining,
            "renderer": self.renderer.info(),
            "ticks": self.ticks,
            "late_ticks": self.late_ticks,
            "load": round(self.load, 3),
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
