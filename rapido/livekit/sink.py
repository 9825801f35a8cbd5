"""LiveKitSink: publishes a session's audio and video into a LiveKit room.

Timing. The engine's clock hands one chunk per frame to :meth:`LiveKitSink.write`, which
only appends to a bounded deque (the event loop must never wait on the network). One
pusher task feeds the audio into ``rtc.AudioSource``, whose ``capture_frame`` returns
once the native queue is at or below ``queue_size_ms``: that is the real-time
back-pressure. The native side sends 10 ms of the queue every 10 ms and sends nothing
while it is empty, so a chunk starts to play when what was queued before it has played,
or at once if the queue ran dry: :class:`~rapido.livekit.playout.AudioPlayout` keeps
that instant. The SDK's own ``queued_duration`` does not: it lets the queue go below
empty, so after every stall longer than the queue it underestimates for good, and video
captured by it led the sound by up to 110 ms under load. The frame's picture is
captured (stamped "now") by a timer at that instant plus ``SEND_DELAY_S``, what the
audio path adds after the queue, so the two stay within a few ms at the receiver.

Connection. The sources work without a room, so the stream runs from the first frame;
a connect task joins the room in the background, publishes both tracks, and on failure
or disconnect marks the sink ``degraded`` (with the reason) and retries with capped,
jittered exponential backoff. Frames keep flowing through the sources meanwhile; they
are counted as ``frames_unpublished`` because nobody receives them.

Adaptive quality. libwebrtc inside the SDK already follows the connection (its own
bandwidth estimate, up to ``max_bitrate``); what it cannot know is this node's load.
``adapt`` (once a second from the engine) feeds the node's load and this sink's own
backlog to its :class:`PublisherQuality`, whose frame rate decides which pictures are
captured: below the source rate only evenly spaced ones (audio is never thinned), so
the native encoder does proportionally less work. While connected, the room's WebRTC
stats are read every ``stats_interval_s`` (:mod:`rapido.livekit.linkstats`): when
libwebrtc says bandwidth limits the video, its target bitrate reaches the controller as
the link's estimate, so the score and ``limited_by`` show a short connection as they do
for the webrtc sink. A target below the ceiling without that reason is not taken as a
short link: libwebrtc's estimate also sits low while it ramps up after a connect and
when easy content never needs the ceiling.

One module of about 500 lines: timing, connection and adaptive quality share the
sink's state (the sources, the room, the pending chunks) and are read together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import numpy as np
from livekit import rtc
from livekit.rtc._proto.room_pb2 import DEGRADATION_PREFERENCE_MAINTAIN_RESOLUTION

from rapido.aio import cancel_and_wait
from rapido.livekit.limits import validate_queue_size_ms
from rapido.livekit.linkstats import VideoLink, video_link
from rapido.livekit.playout import SEND_DELAY_S, AudioPlayout
from rapido.livekit.sinkstats import LiveKitStats
from rapido.pipeline.media import AUDIO_RATE, DEFAULT_FPS, MediaChunk, frame_samples
from rapido.pipeline.quality import PublisherQuality, QualityBounds
from rapido.pipeline.sinks.base import SinkStats

log = logging.getLogger(__name__)

IDLE: Final = "idle"
CONNECTING: Final = "connecting"
CONNECTED: Final = "connected"
DEGRADED: Final = "degraded"
CLOSED: Final = "closed"

#: Codecs a publisher may choose. The SFU never transcodes, so this is what viewers get.
CODECS: Final = {"h264": rtc.VideoCodec.H264, "vp8": rtc.VideoCodec.VP8}

#: Rates libwebrtc's audio device path accepts for a native source.
_AUDIO_RATES: Final = frozenset({8000, 16000, 24000, 32000, 44100, 48000})


def backoff_delay(attempt: int, *, initial_s: float, max_s: float, jitter: float,
                  rng: random.Random) -> float:
    """Delay before retry ``attempt`` (1-based): ``initial * 2**(attempt-1)`` capped at
    ``max_s``, minus up to ``jitter`` of it at random so that many sessions cut off by
    one outage do not all reconnect in the same instant."""
    base = min(max_s, initial_s * (2.0 ** min(attempt - 1, 30)))
    return base * (1.0 - jitter * rng.random())


class LiveKitSink:
    """Publishes one session into one LiveKit room (see the module docstring)."""

    kind = "livekit"

    def __init__(
        self,
        *,
        url: str | None,
        token_factory: Callable[[], str] | None = None,
        width: int = 854,
        height: int = 480,
        fps: int = DEFAULT_FPS,
        audio_rate: int = AUDIO_RATE,
        num_channels: int = 1,
        queue_size_ms: int = 100,
        max_pending: int = 50,
        video_codec: str = "h264",
        max_bitrate: int = 1_500_000,
        min_bitrate: int | None = None,
        simulcast: bool = False,
        min_fps: float | None = None,
        stats_interval_s: float = 2.0,
        connect_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        backoff_jitter: float = 0.3,
        on_connect: Callable[[float], None] | None = None,
        on_state: Callable[[str, str | None], None] | None = None,
        on_room: Callable[[rtc.Room], None] | None = None,
        room_factory: Callable[[], rtc.Room] = rtc.Room,
        rng: random.Random | None = None,
    ) -> None:
        """``url`` None runs the sources without a room (tests, benchmarks).
        ``token_factory`` mints a fresh token for each connect attempt (so a retry hours
        later does not present an expired one). ``on_connect(seconds)`` gets each
        successful connect time (``livekit_connection_seconds``); ``on_state(state,
        reason)`` every state change. ``max_pending`` bounds the chunks waiting for the
        audio source: beyond it the oldest is dropped and counted. ``min_fps`` is the
        lowest frame rate adaptive quality may shed to (default ``fps``: never);
        ``min_bitrate`` the link estimate that scores lowest (default 150 kbps, or
        ``max_bitrate`` if that is lower)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        if audio_rate not in _AUDIO_RATES:
            raise ValueError(f"audio_rate must be one of {sorted(_AUDIO_RATES)}, got {audio_rate}")
        if num_channels != 1:
            # Chunks are mono by contract (media.py); anything else would mismatch the
            # source and the native side rejects frames of the wrong channel count.
            raise ValueError(f"num_channels must be 1 (chunks are mono), got {num_channels}")
        self.queue_size_ms = validate_queue_size_ms(queue_size_ms)
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if video_codec.lower() not in CODECS:
            raise ValueError(f"video_codec must be one of {sorted(CODECS)}, got {video_codec!r}")
        if max_bitrate <= 0:
            raise ValueError(f"max_bitrate must be positive, got {max_bitrate}")
        min_bitrate = min(150_000, max_bitrate) if min_bitrate is None else min_bitrate
        if not 0 < min_bitrate <= max_bitrate:
            raise ValueError(f"min_bitrate must be within 1..max_bitrate ({max_bitrate}), "
                             f"got {min_bitrate}")
        if not 0 < stats_interval_s <= 5.0:
            # Readings go stale in the controller after 10 s: at most every 5 s keeps one.
            raise ValueError(f"stats_interval_s must be within (0, 5], got {stats_interval_s}")
        if connect_timeout_s <= 0 or backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError(
                "need connect_timeout_s > 0 and 0 < backoff_initial_s <= backoff_max_s")
        if not 0.0 <= backoff_jitter < 1.0:
            raise ValueError(f"backoff_jitter must be in [0, 1), got {backoff_jitter}")
        if url is not None and token_factory is None:
            raise ValueError("a token_factory is required with a url")
        self.url = url
        self.width = width
        self.height = height
        self.fps = fps
        self.audio_rate = audio_rate
        self.num_channels = num_channels
        self.samples_per_frame = frame_samples(fps, audio_rate)
        self.video_codec = video_codec.lower()
        self.max_bitrate = max_bitrate
        self.simulcast = simulcast
        self.quality = PublisherQuality(QualityBounds(
            min_bitrate=min_bitrate, max_bitrate=max_bitrate,
            min_fps=fps if min_fps is None else min_fps, max_fps=fps), time.monotonic())
        self._stats_interval = stats_interval_s
        #: The last summary of libwebrtc's video stats (None until it has sent video).
        self.link: VideoLink | None = None
        self.stats_errors = 0
        self._token_factory = token_factory
        self._connect_timeout = connect_timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s, backoff_jitter)
        self._on_connect = on_connect
        #: Called with each newly connected room (e.g. to serve an agent's avatar protocol
        #: there).
        self.on_room = on_room
        self._on_state = on_state
        self._room_factory = room_factory
        self._rng = rng or random.Random()

        self._pending: deque[MediaChunk] = deque()
        self._max_pending = max_pending
        self._wake = asyncio.Event()
        # Video waiting for its audio to start playing: (when it starts, monotonic; frame).
        self._video: deque[tuple[float, rtc.VideoFrame]] = deque()
        self._playout = AudioPlayout()
        self._video_timer: asyncio.TimerHandle | None = None
        self._epoch = 0  # bumped by interrupt: a capture in flight drops its video

        self._audio: rtc.AudioSource | None = None
        self._vsource: rtc.VideoSource | None = None
        self._room: rtc.Room | None = None
        self._pusher: asyncio.Task[None] | None = None
        self._connector: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

        self._state: str = IDLE
        self._reason: str | None = None
        self._closed = False
        # Counters (event loop only).
        self.frames_captured = 0
        self.frames_thinned = 0
        self.audio_frames_captured = 0
        self.frames_unpublished = 0
        self.dropped_backlog = 0
        self.discarded = 0
        self.interrupts = 0
        self.retries = 0
        self.connects = 0
        self.last_connect_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def reason(self) -> str | None:
        return self._reason

    async def start(self) -> None:
        """Create the sources and start pushing; join the room in the background.

        Never fails for network reasons: a room that cannot be reached leaves the sink
        ``degraded`` and retrying while the stream runs."""
        if self._closed or self._pusher is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._audio = rtc.AudioSource(self.audio_rate, self.num_channels,
                                      queue_size_ms=self.queue_size_ms, loop=self._loop)
        self._vsource = rtc.VideoSource(self.width, self.height)
        self._pusher = asyncio.create_task(self._push(), name="rapido-livekit-push")
        if self.url is not None:
            self._set_state(CONNECTING, None)
            self._connector = asyncio.create_task(self._connect_loop(),
                                                  name="rapido-livekit-connect")

    async def aclose(self) -> None:
        """Stop pushing, leave the room, release the native sources. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending.clear()
        self._video.clear()
        if self._video_timer is not None:
            self._video_timer.cancel()
        await cancel_and_wait((self._connector, self._pusher))
        await self._leave_room()
        for src in (self._audio, self._vsource):
            if src is not None:
                with contextlib.suppress(Exception):
                    await src.aclose()
        self._set_state(CLOSED, None)

    # -- the Sink protocol -----------------------------------------------------------

    def write(self, chunk: MediaChunk) -> None:
        """Queue one chunk; returns at once. Raises ValueError for a chunk of the wrong
        shape, which the native side would reject or abort on (an upstream bug)."""
        v = chunk.video
        if (v.width, v.height) != (self.width, self.height):
            raise ValueError(f"video is {v.width}x{v.height}, the source is "
                             f"{self.width}x{self.height}")
        if v.data.dtype != np.uint8 or v.data.size != v.width * v.height * 3 // 2:
            raise ValueError(f"video must be I420 uint8 of {v.width * v.height * 3 // 2} bytes")
        a = chunk.audio
        if a.dtype != np.int16 or a.ndim != 1 or a.shape[0] != self.samples_per_frame:
            raise ValueError(f"audio must be {self.samples_per_frame} int16 mono samples, "
                             f"got {a.dtype} {a.shape}")
        if self._pusher is None or self._closed:
            self.discarded += 1
            return
        if len(self._pending) >= self._max_pending:
            # The audio source is behind real time (a stalled loop): drop the oldest so
            # latency stays bounded rather than growing without limit.
            self._pending.popleft()
            self.dropped_backlog += 1
        self._pending.append(chunk)
        self._wake.set()

    def interrupt(self) -> float:
        """Barge-in: drop our queued chunks and video AND the native audio queue, so no
        old speech plays on (the agents' AvatarRunner misses the latter)."""
        self.interrupts += 1
        self._epoch += 1
        unheard = sum(1 for c in self._pending if c.speaking) * self.samples_per_frame
        self._pending.clear()
        self._video.clear()
        unheard_s = unheard / self.audio_rate
        if self._audio is not None:
            self._audio.clear_queue()
            unheard_s += self._playout.clear(time.monotonic())
        return 1000.0 * unheard_s

    @property
    def playout_frames(self) -> int:
        return self.frames_captured + self.frames_thinned

    def audience(self) -> int:
        """The other participants in the room now (subscribers, an agent): 0 while not
        connected."""
        room = self._room
        return len(room.remote_participants) if room is not None else 0

    def adapt(self, node_load: float, now: float | None = None) -> None:
        """One load sample: the node's, or this sink's backlog if it is worse."""
        self.quality.adapt(
            node_load, time.monotonic() if now is None else now,
            fill=len(self._pending) / self._max_pending, dropped=self.dropped_backlog,
            offered=self.audio_frames_captured + self.dropped_backlog)

    def on_rtc_stats(self, publisher_stats: list[Any], now: float | None = None) -> None:
        """One reading of the room's publisher stats (``RtcStats`` messages): when
        libwebrtc says bandwidth limits the video, its target bitrate becomes the link's
        estimate in the controller; otherwise the link holds nothing down."""
        now = time.monotonic() if now is None else now
        link = video_link(publisher_stats)
        if link is None:
            return
        self.link = link
        estimate = link.target_bitrate if link.limitation == "bandwidth" else self.max_bitrate
        self.quality.controller.on_remb("livekit", estimate, now)

    def quality_score(self) -> float:
        """The controller's score, less the chunks dropped from the backlog lately."""
        return self.quality.score()

    def stats(self) -> SinkStats:
        queued = self._playout.queued(time.monotonic())
        return SinkStats(
            kind=self.kind, frames=self.playout_frames, dropped=self.dropped_backlog,
            interrupts=self.interrupts, quality=self.quality.quality(),
            quality_score=self.quality_score(),
            detail=LiveKitStats(
                state=self._state, reason=self._reason, url=self.url, retries=self.retries,
                connects=self.connects, last_connect_s=self.last_connect_s,
                frames_captured=self.frames_captured,
                audio_frames_captured=self.audio_frames_captured,
                frames_unpublished=self.frames_unpublished, discarded_frames=self.discarded,
                pending_frames=len(self._pending), video_waiting=len(self._video),
                audio_queued_ms=round(1000.0 * queued, 1), video_codec=self.video_codec,
                frames_thinned=self.frames_thinned, link=self.link,
                stats_errors=self.stats_errors))

    # -- pushing ---------------------------------------------------------------------

    async def _push(self) -> None:
        audio = self._audio
        assert audio is not None and self._loop is not None
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            chunk = self._pending.popleft()
            epoch = self._epoch
            frame = rtc.AudioFrame(chunk.audio.tobytes(), self.audio_rate, self.num_channels,
                                   self.samples_per_frame)
            # The samples enter the native buffer within this call, before its first await.
            starts = self._playout.capture(time.monotonic(),
                                           self.samples_per_frame / self.audio_rate,
                                           chunk.speaking)
            try:
                await audio.capture_frame(frame)  # back-pressure: real time
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a native error must not end the stream
                log.warning("livekit sink: audio capture failed: %s", exc)
                continue
            self.audio_frames_captured += 1
            if epoch != self._epoch:
                continue  # interrupted while waiting: its picture goes with its audio
            if not self.quality.keep(chunk.index, self.fps):
                self.frames_thinned += 1  # adaptive quality: the node sheds pictures
                continue
            vframe = rtc.VideoFrame(self.width, self.height, rtc.VideoBufferType.I420,
                                    np.ascontiguousarray(chunk.video.data).tobytes())
            self._video.append((starts + SEND_DELAY_S, vframe))
            self._schedule_video()

    def _schedule_video(self) -> None:
        if self._video_timer is not None or not self._video or self._loop is None:
            return
        delay = max(0.0, self._video[0][0] - time.monotonic())
        self._video_timer = self._loop.call_later(delay, self._release_video)

    def _release_video(self) -> None:
        self._video_timer = None
        vsource = self._vsource
        now = time.monotonic()
        while self._video and self._video[0][0] <= now + 0.001:
            _, vframe = self._video.popleft()
            if vsource is None or self._closed:
                return
            # Stamped "now" (0), released when its audio starts. Not an intended instant:
            # libwebrtc's TimestampAligner moves every stamp by the mean lateness of the
            # releases and, for good, by any release earlier than that mean (its clip
            # bias never shrinks), which after a loaded spell put pictures 30-110 ms
            # ahead of their sound. "Now" has a steady offset to its clock.
            vsource.capture_frame(vframe)
            self.frames_captured += 1
            if self._state != CONNECTED:
                self.frames_unpublished += 1
        self._schedule_video()

    # -- connection ------------------------------------------------------------------

    def _set_state(self, state: str, reason: str | None) -> None:
        if (state, reason) == (self._state, self._reason):
            return
        self._state, self._reason = state, reason
        if state == DEGRADED:
            log.warning("livekit sink %s: degraded: %s", self.url, reason)
        if self._on_state is not None:
            try:
                self._on_state(state, reason)
            except Exception:
                log.exception("livekit sink: on_state callback failed")

    async def _connect_loop(self) -> None:
        attempt = 0
        initial, cap, jitter = self._backoff
        while not self._closed:
            reason = await self._connect_once()
            if reason is None:
                attempt = 0
                reason = await self._wait_disconnected()
                await self._leave_room()
            if self._closed:
                return
            attempt += 1
            self.retries += 1
            self._set_state(DEGRADED, reason)
            await asyncio.sleep(backoff_delay(attempt, initial_s=initial, max_s=cap,
                                              jitter=jitter, rng=self._rng))

    async def _connect_once(self) -> str | None:
        """Join and publish; None on success, else why it failed."""
        assert self.url is not None and self._token_factory is not None
        assert self._audio is not None and self._vsource is not None
        room = self._room_factory()
        self._room = room
        t0 = time.monotonic()
        try:
            token = self._token_factory()
            await asyncio.wait_for(room.connect(self.url, token), self._connect_timeout)
            lp = room.local_participant
            vtrack = rtc.LocalVideoTrack.create_video_track("avatar-video", self._vsource)
            atrack = rtc.LocalAudioTrack.create_audio_track("avatar-audio", self._audio)
            vopts = rtc.TrackPublishOptions(
                source=rtc.TrackSource.SOURCE_CAMERA,
                video_codec=CODECS[self.video_codec],
                simulcast=self.simulcast,
                video_encoding=rtc.VideoEncoding(max_bitrate=self.max_bitrate,
                                                 max_framerate=float(self.fps)),
                # Left unset, libwebrtc may trade resolution for frame rate: it starts a
                # new connection at 3/4 size (854x480 arrived as 636x360) and climbs back
                # only after seconds of ample bandwidth. The picture keeps its size; the
                # frame rate is what gives way (adaptive quality sheds it here first).
                degradation_preference=DEGRADATION_PREFERENCE_MAINTAIN_RESOLUTION,
            )
            aopts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            await asyncio.wait_for(lp.publish_track(vtrack, vopts), self._connect_timeout)
            await asyncio.wait_for(lp.publish_track(atrack, aopts), self._connect_timeout)
        except asyncio.CancelledError:
            await self._leave_room()
            raise
        except TimeoutError:
            await self._leave_room()
            return f"connect timed out after {self._connect_timeout:g} s"
        except Exception as exc:
            await self._leave_room()
            return f"connect failed: {type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - t0
        self.connects += 1
        self.last_connect_s = elapsed
        if self._on_connect is not None:
            try:
                self._on_connect(elapsed)
            except Exception:
                log.exception("livekit sink: on_connect callback failed")
        if self.on_room is not None:
            try:
                self.on_room(room)
            except Exception:
                log.exception("livekit sink: on_room callback failed")
        self._set_state(CONNECTED, None)
        return None

    async def _wait_disconnected(self) -> str:
        room = self._room
        assert room is not None
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_disconnected(reason: Any = None) -> None:
            if not done.done():
                done.set_result(f"disconnected: {reason}")

        def on_reconnecting() -> None:
            # The SDK retries by itself first; the stream is not reaching viewers meanwhile.
            self._set_state(DEGRADED, "reconnecting")

        def on_reconnected() -> None:
            self._set_state(CONNECTED, None)

        room.on("disconnected", on_disconnected)
        room.on("reconnecting", on_reconnecting)
        room.on("reconnected", on_reconnected)
        if not room.isconnected():
            on_disconnected("before publishing finished")
        poller = asyncio.create_task(self._poll_stats(room, done), name="rapido-livekit-stats")
        try:
            return await done
        finally:
            # The poller also ends by itself once `done` is set, so a cancel it happens to
            # swallow (one arriving as a stats reply lands) cannot hold this up for good.
            await cancel_and_wait([poller])

    async def _poll_stats(self, room: rtc.Room, done: asyncio.Future[str]) -> None:
        """Read the room's WebRTC stats until it disconnects (see ``on_rtc_stats``)."""
        while not (done.done() or self._closed):
            await asyncio.sleep(self._stats_interval)
            if done.done() or self._closed or not room.isconnected():
                continue
            try:
                async with asyncio.timeout(self._stats_interval):
                    stats = await room.get_rtc_stats()
                self.on_rtc_stats(list(stats.publisher_stats))
            except Exception as exc:  # stats are advisory: never let them end a stream
                self.stats_errors += 1
                log.debug("livekit sink: reading stats failed: %s", exc)

    async def _leave_room(self) -> None:
        room, self._room = self._room, None
        if room is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(room.disconnect(), 5.0)
