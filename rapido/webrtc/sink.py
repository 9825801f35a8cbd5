"""Serve one session to any number of WebRTC viewers, encoding each stream once.

The sink owns the stream's :class:`~rapido.webrtc.encoders.SharedEncoders` (one
encoder per codec in use) and fans their packets out to every viewer's
:class:`~rapido.webrtc.track.PacketTrack`; it answers each viewer's SDP offer with an
aiortc peer connection of its own.

Threads: the event loop only queues chunks (``write`` returns at once) on the sink's
lane of the node's :class:`EncoderPool` (a few threads shared by every sink, one lane
handled by one thread at a time, in order); the lane owns the sink's encoders and
hands finished packets back to the loop with ``call_soon_threadsafe``, where they are
fanned out to the viewers' queues. The video and audio packets of one chunk carry the
same instant and are sent in the same loop callback (aiortc's sender reports send
time against RTP time in its sender reports, which is what a browser lip-syncs by).

Adaptive quality: a :class:`PublisherQuality` per sink turns the viewers' RTCP
(receiver reports' loss, REMB) and the node's load (``adapt``, once a second from the
engine) into a bitrate and a frame rate within configured bounds, which the encoders
follow (a bitrate change re-opens them, a lower frame rate thins the pictures).

Viewers: each holds one of ``max_viewers`` slots from the moment its offer is taken
(counted before the first await, so concurrent offers cannot overshoot) until it is
removed, whatever the way out. One that is not ``connected`` ``connect_timeout_s``
after its answer is closed and its slot freed at once (``on_connect_timeout`` counts
it): an offer whose ICE never completes would otherwise hold a peer connection, its
UDP sockets and a slot for the session's life. A closing sink takes no viewer, even
one whose offer was being answered when the close began.

Keyframes: aiortc's own keyframe flag (set on PLI/FIR) is only read on its encode
path, which shared packets bypass, so each viewer's sender is pointed at
:meth:`WebRtcSink.request_keyframe` instead (:mod:`rapido.webrtc.patches`).

One module, over 500 lines: the viewers' slots, the fan-out's consumers and the
encoder lane are one sink's state, each read by the others (a departing viewer
detaches from the encoders, the close sweeps viewers before it joins the lane).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    unpack_remb_fci,
)

from rapido.pipeline.media import AUDIO_RATE, MediaChunk, frame_samples
from rapido.pipeline.quality import PublisherQuality, QualityBounds
from rapido.pipeline.sinks.base import SinkError, SinkStats, error_text
from rapido.pipeline.sinks.pool import EncoderPool, Lane
from rapido.webrtc.encoders import H264, OPUS, VIDEO_CODECS, Encoded, SharedEncoders
from rapido.webrtc.ice import is_turn
from rapido.webrtc.patches import redirect_keyframe_requests, tap_rtcp
from rapido.webrtc.sdp import InvalidOffer, check_offer, has_candidates, negotiated
from rapido.webrtc.track import PacketTrack

log = logging.getLogger(__name__)


class SinkClosed(SinkError):
    """The sink is closing or closed: it takes no new viewer."""


@dataclass(frozen=True, slots=True)
class WebRtcStats:
    """The webrtc sink's own part of :class:`SinkStats` (``frames`` is chunks encoded,
    ``encoded`` pictures encoded: fewer when the frame rate is thinned)."""

    viewers: int
    viewers_total: int
    #: Offers being answered (each already holds a viewer slot).
    viewers_joining: int
    #: Viewers closed for not connecting within the connect timeout.
    connect_timeouts: int
    #: Encoders running, by codec (at most one each).
    encoders: dict[str, int]
    encoders_created: int
    #: Tracks reading each encoder.
    consumers: dict[str, int]
    frames_in: int
    queue_depth: int
    #: The quality controller's view of each viewer (loss, REMB, estimate).
    receivers: dict[str, dict[str, float | int | None]]

    def json(self, stats: SinkStats) -> dict[str, Any]:
        return {
            "kind": stats.kind,
            "viewers": self.viewers,
            "viewers_total": self.viewers_total,
            "viewers_joining": self.viewers_joining,
            "connect_timeouts": self.connect_timeouts,
            "encoders": self.encoders,
            "encoders_created": self.encoders_created,
            "consumers": self.consumers,
            "frames_in": self.frames_in,
            "frames_encoded": stats.frames,
            "video_frames_encoded": stats.encoded,
            "dropped_frames": stats.dropped,
            "queue_depth": self.queue_depth,
            "interrupts": stats.interrupts,
            "quality": stats.quality_json(),
            "receivers": self.receivers,
            "error": stats.error,
        }


@dataclass(eq=False)
class Viewer:
    id: str
    pc: RTCPeerConnection
    tracks: list[PacketTrack] = field(default_factory=list)
    #: Closes the viewer unless it is connected by then; None once it is (or it is gone).
    deadline: asyncio.TimerHandle | None = None


class WebRtcSink:
    """Encodes a session once per codec in use and serves it to WebRTC viewers."""

    kind = "webrtc"

    def __init__(
        self,
        *,
        width: int,
        height: int,
        fps: int,
        video_bitrate: int = 1_000_000,
        audio_bitrate: int = 48_000,
        x264_preset: str = "veryfast",
        threads: int = 1,
        max_queue: int = 25,
        max_viewers: int = 100,
        connect_timeout_s: float = 20.0,
        ice_servers: tuple[str, ...] = (),
        turn_username: str = "",
        turn_password: str = "",
        on_connect_timeout: Callable[[], None] | None = None,
        min_bitrate: int | None = None,
        min_fps: float | None = None,
        warm: bool = False,
        warm_codec: str = H264,
        pool: EncoderPool | None = None,
    ) -> None:
        """``threads`` is each video encoder's thread count; 0 lets the codec choose
        (one per core, too many once dozens of streams share a machine).

        ``video_bitrate`` and ``fps`` are the ceilings of adaptive quality,
        ``min_bitrate`` and ``min_fps`` its floors (by default the ceilings: no
        adaptation). ``warm`` keeps a ``warm_codec`` (H.264 or VP8) and an Opus
        encoder running with no
        viewer, so a viewer's first picture is the next keyframe, not an encoder
        start (and so a benchmark measures real encoding). ``pool`` is the node's
        shared encoder pool; without one the sink runs a one-thread pool of its own.

        ``ice_servers``: ``stun:``/``turn:`` URLs (:func:`rapido.webrtc.ice.
        parse_ice_urls`), TURN ones used with ``turn_username``/``turn_password``; none
        (the default) means host candidates only, never aiortc's public STUN default."""
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_viewers < 1:
            raise ValueError(f"max_viewers must be at least 1, got {max_viewers}")
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be positive, got {connect_timeout_s}")
        self.width = width
        self.height = height
        self.fps = fps
        self.samples_per_frame = frame_samples(fps)
        self.video_bitrate = video_bitrate
        self.audio_bitrate = audio_bitrate
        self.x264_preset = x264_preset
        self.threads = threads
        self.max_viewers = max_viewers
        self.connect_timeout_s = connect_timeout_s
        self._ice_servers = [
            RTCIceServer(urls=url, username=turn_username, credential=turn_password)
            if is_turn(url) else RTCIceServer(urls=url) for url in ice_servers]
        self._on_connect_timeout = on_connect_timeout
        if warm_codec not in VIDEO_CODECS:
            raise ValueError(f"warm_codec must be one of {', '.join(VIDEO_CODECS)}, "
                             f"got {warm_codec!r}")
        self.warm = frozenset((warm_codec, OPUS)) if warm else frozenset()
        # Its target is what the worker encodes at: replaced whole by the loop (atomic),
        # read per frame.
        self.quality = PublisherQuality(QualityBounds(
            min_bitrate=video_bitrate if min_bitrate is None else min_bitrate,
            max_bitrate=video_bitrate,
            min_fps=fps if min_fps is None else min_fps, max_fps=fps), time.monotonic())

        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_queue = max_queue
        self._pool = pool
        self._own_pool: EncoderPool | None = None
        self._lane: Lane | None = None
        self._started = False
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None

        # Loop side: who listens to which encoder. The worker reads ``_wanted``, a
        # frozenset replaced whole, to know which encoders to run.
        self._consumers: dict[str, set[PacketTrack]] = {}
        self._wanted: frozenset[str] = self.warm
        self.viewers: dict[str, Viewer] = {}
        # Offers being answered: their slots are held before the first await.
        self._joining = 0
        # Peer connections of timed-out viewers, closing; waited for by aclose.
        self._reaping: set[asyncio.Task[None]] = set()

        # Worker side.
        self.encoders = SharedEncoders(
            width=width, height=height, fps=fps, samples_per_frame=self.samples_per_frame,
            audio_bitrate=audio_bitrate, x264_preset=x264_preset, threads=threads)

        # Counters (each written by one side only).
        self._frames_in = 0
        self._frames_encoded = 0
        self._dropped = 0
        self._interrupts = 0
        self._viewers_total = 0
        self._connect_timeouts = 0
        self._error: BaseException | None = None

    # -- the sink seam (event loop) --------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise SinkError("webrtc sink is closed")
        if self._started:
            return
        # Fail the session now, not at the first viewer, if a codec is missing.
        for name in ("libx264", "libvpx", "libopus"):
            try:
                av.Codec(name, "w")
            except Exception as exc:
                raise SinkError(f"encoder {name} is not available: {exc}") from exc
        self._loop = asyncio.get_running_loop()
        pool = self._pool
        if pool is None:
            pool = self._own_pool = EncoderPool(1, name="rapido-webrtc")
        self._lane = pool.lane(self._handle, max_queue=self._max_queue, name="webrtc sink")
        self._started = True

    def write(self, chunk: MediaChunk) -> None:
        if not self._started or self._closed or self._lane is None:
            return
        self._frames_in += 1
        if not self._wanted and not self.encoders:
            # Nobody is watching: encoding would be wasted work. (While encoders are
            # still open the chunk goes on, so the worker sees they are unwanted and
            # closes them.)
            return
        if not self._lane.put(chunk):
            # Dropping the whole chunk keeps audio and video of what is sent together.
            self._dropped += 1

    def interrupt(self) -> float:
        self._interrupts += 1
        dropped: list[MediaChunk] = self._lane.clear() if self._lane is not None else []
        # What the viewers' tracks still hold is encoded and differs per viewer (a frame
        # or two each); it is dropped but not counted.
        for tracks in self._consumers.values():
            for track in tracks:
                track.flush()
        return 1000.0 * sum(c.audio.shape[0] for c in dropped if c.speaking) / AUDIO_RATE

    @property
    def playout_frames(self) -> int:
        return self._frames_encoded

    def audience(self) -> int:
        """The WHEP viewers connected now."""
        return len(self.viewers)

    def encoder_counts(self) -> dict[str, int]:
        """Encoders running, by codec: at most one each, however many viewers."""
        return self.encoders.counts()

    def stats(self) -> SinkStats:
        return SinkStats(
            kind=self.kind, frames=self._frames_encoded, dropped=self._dropped,
            interrupts=self._interrupts, encoded=self.encoders.video_frames,
            quality=self.quality.quality(), quality_score=self.quality_score(),
            error=error_text(self._error),
            detail=WebRtcStats(
                viewers=len(self.viewers), viewers_total=self._viewers_total,
                viewers_joining=self._joining, connect_timeouts=self._connect_timeouts,
                encoders=self.encoder_counts(), encoders_created=self.encoders.created,
                consumers={k: len(v) for k, v in sorted(self._consumers.items())},
                frames_in=self._frames_in,
                queue_depth=self._lane.qsize() if self._lane is not None else 0,
                receivers=self.quality.controller.receivers()))

    # -- adaptive quality (event loop) -------------------------------------------------

    def adapt(self, node_load: float, now: float | None = None) -> None:
        """One load sample from the engine: the node's load, raised to 1.5 if this
        sink's own encoder dropped chunks since the last sample (it is not keeping up,
        whatever the node says), or to its queue's fill."""
        self.quality.adapt(
            node_load, time.monotonic() if now is None else now,
            fill=(self._lane.qsize() if self._lane is not None else 0) / self._max_queue,
            dropped=self._dropped, offered=self._frames_in)

    def quality_score(self) -> float:
        """The controller's score, less the chunks an overrun encoder dropped lately
        (those are stutter, not a chosen lower frame rate)."""
        return self.quality.score()

    def _on_feedback(self, viewer_id: str, ssrc: int, packet: object) -> None:
        """RTCP from one viewer's video sender: its loss and REMB feed the controller."""
        if viewer_id not in self.viewers:
            return  # a report that raced the viewer's removal must not bring it back
        now = time.monotonic()
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == ssrc:
                    self.quality.controller.on_receiver_report(
                        viewer_id, report.fraction_lost / 256, now)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if ssrc in ssrcs:
                self.quality.controller.on_remb(viewer_id, bitrate, now)
        else:
            return
        self.quality.retarget(now)

    async def aclose(self) -> None:
        """Idempotent; concurrent callers wait for the same close, and a caller being
        cancelled (a client gone mid-DELETE) does not leave it half done."""
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        await asyncio.gather(*(self.remove_viewer(v) for v in list(self.viewers)),
                             return_exceptions=True)
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)
        lane = self._lane
        if lane is not None:
            # Nothing is put after _closed; wait for what is in hand, then let go of
            # the encoders (the lane is idle, so no worker touches them any more).
            await asyncio.to_thread(lane.join)
            self.encoders.clear()
        if self._own_pool is not None:
            await asyncio.to_thread(self._own_pool.close)

    # -- viewers ---------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Closing or closed: no new viewer."""
        return self._closed

    @property
    def full(self) -> bool:
        """Every viewer slot is held (by viewers, or by offers being answered)."""
        return len(self.viewers) + self._joining >= self.max_viewers

    async def add_viewer(self, offer_sdp: str) -> tuple[str, str]:
        """Answer a viewer's offer; returns (viewer id, answer SDP). Raises
        :class:`InvalidOffer` for an offer that cannot be answered, :class:`SinkClosed`
        once the sink is closing, :class:`SinkError` when it is not running or full.

        The viewer's slot is taken before the first await and given back on every way
        out but success (an error, a cancelled request, a close meanwhile)."""
        if self._closed:
            raise SinkClosed("the session is closing; it takes no new viewers")
        if not self._started:
            raise SinkError("webrtc sink is not running")
        if self.full:
            raise SinkError(f"this stream has its limit of {self.max_viewers} viewers")
        offer = check_offer(offer_sdp)
        self._joining += 1
        try:
            return await self._answer(offer_sdp, complete=has_candidates(offer))
        finally:
            self._joining -= 1

    async def _answer(self, offer_sdp: str, *, complete: bool) -> tuple[str, str]:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        viewer = Viewer(uuid.uuid4().hex, pc)
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            except Exception as exc:
                raise InvalidOffer(f"the SDP offer was not accepted: {exc}") from None
            if complete:
                # Non-trickle (sdp.has_candidates): no candidate will follow.
                await pc.addIceCandidate(None)
            kinds = {t.kind for t in pc.getTransceivers()}
            if not kinds & {"audio", "video"}:
                raise InvalidOffer("the offer has no audio or video section")
            senders = {}
            for kind in ("video", "audio"):
                if kind in kinds:
                    track = PacketTrack(self, kind)
                    viewer.tracks.append(track)
                    senders[kind] = (pc.addTrack(track), track)
            answer = await pc.createAnswer()
            # aiortc gathers every ICE candidate inside setLocalDescription, so the
            # answer below is complete (WHEP has no trickle here).
            await pc.setLocalDescription(answer)
            codecs = negotiated(pc.localDescription.sdp)
            for kind, (sender, track) in senders.items():
                codec = codecs.get(kind)
                if codec is None or (kind == "video" and codec not in VIDEO_CODECS) \
                        or (kind == "audio" and codec != OPUS):
                    # The viewer offered nothing we encode: the m-line stays unused.
                    sender.replaceTrack(None)
                    viewer.tracks.remove(track)
                    continue
                track.bind(codec)
                redirect_keyframe_requests(sender, partial(self.request_keyframe, codec))
                if kind == "video":
                    tap_rtcp(sender, viewer.id, self._on_feedback)
            if not viewer.tracks:
                raise InvalidOffer("the offer has no H.264, VP8 or Opus media to receive")
            if self._closed:
                # The close began while this offer was answered; its sweep of the
                # viewers is done or under way, and would not see this one.
                raise SinkClosed("the session closed while the offer was answered")
        except BaseException:
            for track in viewer.tracks:
                track.stop()
            await pc.close()
            raise
        self.viewers[viewer.id] = viewer
        self._viewers_total += 1
        loop = asyncio.get_running_loop()
        viewer.deadline = loop.call_later(self.connect_timeout_s, self._connect_deadline,
                                          viewer)

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState == "connected" and viewer.deadline is not None:
                viewer.deadline.cancel()
                viewer.deadline = None
            elif pc.connectionState in ("failed", "closed"):
                await self.remove_viewer(viewer.id)

        return viewer.id, pc.localDescription.sdp

    def _connect_deadline(self, viewer: Viewer) -> None:
        """``connect_timeout_s`` after the answer: a viewer not connected yet goes, and
        its slot is free as this returns (its peer connection closes in the background,
        waited for by ``aclose``)."""
        viewer.deadline = None
        if self.viewers.get(viewer.id) is not viewer or viewer.pc.connectionState == "connected":
            return
        log.warning("webrtc sink: viewer %s not connected %.1f s after its offer (ICE %s, "
                    "connection %s); closing it", viewer.id, self.connect_timeout_s,
                    viewer.pc.iceConnectionState, viewer.pc.connectionState)
        self._connect_timeouts += 1
        if self._on_connect_timeout is not None:
            self._on_connect_timeout()
        self._forget(viewer.id)
        task = asyncio.get_running_loop().create_task(
            viewer.pc.close(), name=f"webrtc-reap-{viewer.id[:8]}")
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    def _forget(self, viewer_id: str) -> Viewer | None:
        """Take a viewer out (its slot is free on return); its peer connection is the
        caller's to close."""
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return None
        if viewer.deadline is not None:
            viewer.deadline.cancel()
            viewer.deadline = None
        self.quality.controller.forget(viewer_id)
        for track in viewer.tracks:
            track.stop()
        return viewer

    async def remove_viewer(self, viewer_id: str) -> bool:
        viewer = self._forget(viewer_id)
        if viewer is None:
            return False
        await viewer.pc.close()
        return True

    def request_keyframe(self, codec: str) -> None:
        self.encoders.request_keyframe(codec)

    # -- the tracks' fan-out (track.PacketSource) --------------------------------------

    def attach(self, track: PacketTrack) -> None:
        assert track.codec is not None
        if self._closed:
            return
        self._consumers.setdefault(track.codec, set()).add(track)
        self._update_wanted()
        self.request_keyframe(track.codec)

    def detach(self, track: PacketTrack) -> None:
        if track.codec is None:
            return
        tracks = self._consumers.get(track.codec)
        if tracks is None:
            return
        tracks.discard(track)
        if not tracks:
            del self._consumers[track.codec]
        self._update_wanted()

    def _update_wanted(self) -> None:
        self._wanted = frozenset(self._consumers) | self.warm

    def _deliver(self, out: Encoded) -> None:
        for codec, packet, keyframe in out:
            for track in list(self._consumers.get(codec, ())):
                track.push(packet, keyframe)

    # -- worker thread -----------------------------------------------------------------

    def _handle(self, chunk: MediaChunk) -> None:
        """One chunk, on the sink's lane (one pool thread at a time, in order)."""
        loop = self._loop
        assert loop is not None
        target = self.quality.target  # read once: the loop may replace it meanwhile
        try:
            out = self.encoders.encode(chunk, self._wanted, target.bitrate, target.fps)
        except Exception as exc:
            # A broken encoder is rebuilt on the next chunk (and starts with a
            # keyframe), rather than ending the stream for every viewer.
            if self._error is None:
                log.exception("webrtc sink: encoding failed")
            self._error = exc
            self.encoders.clear()
            return
        self._frames_encoded += 1
        if out:
            try:
                loop.call_soon_threadsafe(self._deliver, out)
            except RuntimeError:  # the loop is gone: the node is stopping
                pass
