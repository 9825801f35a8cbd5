"""Serve one session to any number of WebRTC viewers, encoding each stream once.

aiortc's ``RTCRtpSender`` normally runs one encoder per peer connection. With a
hundred viewers of one lesson that is a hundred identical H.264 encodes. Here the
sink owns one encoder per codec in use (H.264 and/or VP8) plus one Opus encoder, and
each viewer's sender gets a :class:`PacketTrack` whose ``recv()`` returns the shared
``av.Packet``: for a packet (not a frame) aiortc only packetises (``encoder.pack``),
so the per-viewer cost is RTP framing and SRTP, not encoding.

Threads: the event loop only queues chunks (``write`` returns at once) on the sink's
lane of the node's :class:`EncoderPool` (a few threads shared by every sink, one lane
handled by one thread at a time, in order); the lane owns the sink's encoders and
hands finished packets back to the loop with ``call_soon_threadsafe``, where they are
fanned out to the viewers' queues.

Timestamps: video pts is ``index`` frames at 90 kHz, audio pts is ``index * samples
per frame`` at 48 kHz, so the two streams of one chunk carry the same instant and are
sent in the same loop callback (aiortc's sender reports send time against RTP time in
its sender reports, which is what a browser lip-syncs by).

Adaptive quality: a :class:`QualityController` per sink turns the viewers' RTCP
(receiver reports' loss, REMB) and the node's load (``adapt``, once a second from the
engine) into a bitrate and a frame rate within configured bounds. The worker re-opens
a video encoder when the bitrate changes (which starts it on a keyframe) and, below
the source rate, encodes only evenly spaced frames (no re-open: libx264 keeps each
picture's bits, so the stream's bitrate falls with its frame rate); audio is never
thinned. RTP time still comes from the frame's index, so a thinned stream stays in
sync with its audio.

Keyframes: aiortc's own keyframe flag (set on PLI/FIR) is only read on its encode
path, which shared packets bypass, so each viewer's sender is pointed at
:meth:`WebRtcSink.request_keyframe` instead. A viewer also needs a keyframe to start:
its track drops video until one arrives and asks the encoder for one when it joins.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import multiprocessing
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final, cast

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    unpack_remb_fci,
)
from aiortc.sdp import SessionDescription
from av.audio.codeccontext import AudioCodecContext
from av.video.codeccontext import VideoCodecContext

from rapido.pipeline.media import AUDIO_RATE, MediaChunk, frame_samples
from rapido.pipeline.quality import (
    Backlog,
    Quality,
    QualityBounds,
    QualityController,
    keep_frame,
)
from rapido.pipeline.sinks.base import SinkError
from rapido.pipeline.sinks.frames import to_av_frame
from rapido.pipeline.sinks.pool import EncoderPool, Lane

log = logging.getLogger(__name__)

VIDEO_CLOCK: Final = 90_000
VIDEO_TB: Final = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_TB: Final = fractions.Fraction(1, AUDIO_RATE)
#: Opus at 20 ms per packet, what every WebRTC stack sends by default.
OPUS_FRAME: Final = AUDIO_RATE // 50

#: Codec keys as aiortc names them (``mimeType`` lower-cased).
H264: Final = "video/h264"
VP8: Final = "video/vp8"
OPUS: Final = "audio/opus"
VIDEO_CODECS: Final = (H264, VP8)

#: Packets a viewer may have waiting (about 2 s of video): a viewer whose connection
#: stalls this long is resynchronised at the next keyframe rather than buffered forever.
VIEWER_QUEUE: Final = 50


class InvalidOffer(ValueError):
    """The viewer's SDP offer could not be used."""


@dataclass(slots=True)
class _Enc:
    """One encoder, owned by its lane's worker. Keyframe requests come from the loop
    as a counter (an int store is atomic); the worker serves every request made before
    it reads the counter, so a request made while it encodes is not lost."""

    key: str
    ctx: VideoCodecContext | AudioCodecContext
    bitrate: int = 0
    key_requests: int = 1  # a new encoder starts with a keyframe
    key_served: int = 0

    @property
    def keyframe(self) -> bool:
        """A keyframe has been asked for and not yet encoded."""
        return self.key_requests != self.key_served


@dataclass(eq=False)
class Viewer:
    id: str
    pc: RTCPeerConnection
    tracks: list[PacketTrack] = field(default_factory=list)


class PacketTrack(MediaStreamTrack):
    """A viewer's end of a shared encoder: ``recv()`` yields already encoded packets.

    The track joins its encoder's fan-out on the first ``recv()``, i.e. when the
    viewer's connection is up and its sender starts reading, so nothing piles up for a
    viewer still doing ICE and no encoder runs for viewers that never connect."""

    def __init__(self, sink: WebRtcSink, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._sink = sink
        self.codec: str | None = None
        self._queue: deque[av.Packet] = deque()
        self._wake = asyncio.Event()
        self._joined = False
        # Video can only be decoded from a keyframe on; audio from any packet.
        self.needs_keyframe = kind == "video"
        self.dropped = 0

    def bind(self, codec: str) -> None:
        self.codec = codec

    async def recv(self) -> av.Packet:
        if self.readyState != "live" or self.codec is None:
            raise MediaStreamError
        if not self._joined:
            self._joined = True
            self._sink._join(self)
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
            if self.readyState != "live":
                raise MediaStreamError
        return self._queue.popleft()

    def push(self, packet: av.Packet, keyframe: bool) -> None:
        if self.needs_keyframe:
            if not keyframe:
                return
            self.needs_keyframe = False
        if len(self._queue) >= VIEWER_QUEUE:
            self.dropped += len(self._queue)
            self._queue.clear()
            if self.kind == "video":
                # The packets just dropped were references for what follows.
                self.needs_keyframe = True
                assert self.codec is not None
                self._sink.request_keyframe(self.codec)
                if not keyframe:
                    return
                self.needs_keyframe = False
        self._queue.append(packet)
        self._wake.set()

    def flush(self) -> None:
        """Drop what is waiting (barge-in); video then restarts at a keyframe."""
        if not self._queue:
            return
        self.dropped += len(self._queue)
        self._queue.clear()
        if self.kind == "video" and self.codec is not None:
            self.needs_keyframe = True
            self._sink.request_keyframe(self.codec)

    def stop(self) -> None:
        super().stop()
        self._wake.set()
        self._sink._leave(self)


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
        shared encoder pool; without one the sink runs a one-thread pool of its own."""
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.width = width
        self.height = height
        self.fps = fps
        self.samples_per_frame = frame_samples(fps)
        self.video_bitrate = video_bitrate
        self.audio_bitrate = audio_bitrate
        self.x264_preset = x264_preset
        self.threads = threads
        self.max_viewers = max_viewers
        if warm_codec not in VIDEO_CODECS:
            raise ValueError(f"warm_codec must be one of {', '.join(VIDEO_CODECS)}, "
                             f"got {warm_codec!r}")
        self.warm = frozenset((warm_codec, OPUS)) if warm else frozenset()
        self.quality = QualityController(QualityBounds(
            min_bitrate=video_bitrate if min_bitrate is None else min_bitrate,
            max_bitrate=video_bitrate,
            min_fps=fps if min_fps is None else min_fps, max_fps=fps))
        first = self.quality.update(time.monotonic())
        # What the worker encodes at: replaced whole by the loop (atomic), read per frame.
        self._target: tuple[int, Fraction] = (first.bitrate, first.fps)
        self._backlog = Backlog()  # drops are stutter: they count as load and in the score

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

        # Worker side.
        self._encoders: dict[str, _Enc] = {}
        self._audio_next: int | None = None

        # Counters (each written by one side only).
        self._frames_in = 0
        self._frames_encoded = 0
        self._video_frames = 0  # pictures encoded (fewer than chunks when thinned)
        self._dropped = 0
        self._interrupts = 0
        self._encoders_created = 0
        self._viewers_total = 0
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
        if not self._wanted and not self._encoders:
            # Nobody is watching: encoding would be wasted work. (While encoders are
            # still open the chunk goes on, so the worker sees they are unwanted and
            # closes them.)
            return
        if not self._lane.put(chunk):
            # Dropping the whole chunk keeps audio and video of what is sent together.
            self._dropped += 1

    def interrupt(self) -> None:
        self._interrupts += 1
        if self._lane is not None:
            self._lane.clear()
        for tracks in self._consumers.values():
            for track in tracks:
                track.flush()

    @property
    def playout_frames(self) -> int:
        return self._frames_encoded

    def encoder_counts(self) -> dict[str, int]:
        """Encoders running, by codec: at most one each, however many viewers."""
        # list() copies the worker's dict in one step (atomic under the GIL).
        return {key: 1 for key in sorted(list(self._encoders))}

    def stats(self) -> dict[str, Any]:
        err = self._error
        return {
            "kind": self.kind,
            "viewers": len(self.viewers),
            "viewers_total": self._viewers_total,
            "encoders": self.encoder_counts(),
            "encoders_created": self._encoders_created,
            "consumers": {k: len(v) for k, v in sorted(self._consumers.items())},
            "frames_in": self._frames_in,
            "frames_encoded": self._frames_encoded,
            "video_frames_encoded": self._video_frames,
            "dropped_frames": self._dropped,
            "queue_depth": self._lane.qsize() if self._lane is not None else 0,
            "interrupts": self._interrupts,
            "quality": {**self.quality.quality().as_json(),
                        "score": round(self.quality_score(), 3)},
            "receivers": self.quality.receivers(),
            "error": None if err is None else f"{type(err).__name__}: {err}",
        }

    # -- adaptive quality (event loop) -------------------------------------------------

    def adapt(self, node_load: float, now: float | None = None) -> Quality:
        """One load sample from the engine: the node's load, raised to 1.5 if this
        sink's own encoder dropped chunks since the last sample (it is not keeping up,
        whatever the node says), or to its queue's fill."""
        now = time.monotonic() if now is None else now
        own = self._backlog.sample(
            fill=(self._lane.qsize() if self._lane is not None else 0) / self._max_queue,
            dropped=self._dropped, offered=self._frames_in)
        self.quality.on_load(max(node_load, own), now)
        return self._retarget(now)

    def quality_score(self) -> float:
        """The controller's score, less the chunks an overrun encoder dropped lately
        (those are stutter, not a chosen lower frame rate)."""
        return self.quality.quality().score * self._backlog.delivered

    def _retarget(self, now: float) -> Quality:
        q = self.quality.update(now)
        self._target = (q.bitrate, q.fps)
        return q

    def _on_feedback(self, viewer_id: str, ssrc: int, packet: object) -> None:
        """RTCP from one viewer's video sender: its loss and REMB feed the controller."""
        if viewer_id not in self.viewers:
            return  # a report that raced the viewer's removal must not bring it back
        now = time.monotonic()
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == ssrc:
                    self.quality.on_receiver_report(viewer_id, report.fraction_lost / 256,
                                                     now)
        elif isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if ssrc in ssrcs:
                self.quality.on_remb(viewer_id, bitrate, now)
        else:
            return
        self._retarget(now)

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
        lane = self._lane
        if lane is not None:
            # Nothing is put after _closed; wait for what is in hand, then let go of
            # the encoders (the lane is idle, so no worker touches them any more).
            await asyncio.to_thread(lane.join)
            self._encoders.clear()
        if self._own_pool is not None:
            await asyncio.to_thread(self._own_pool.close)

    # -- viewers ---------------------------------------------------------------------

    async def add_viewer(self, offer_sdp: str) -> tuple[str, str]:
        """Answer a viewer's offer; returns (viewer id, answer SDP). Raises
        :class:`InvalidOffer` for an offer that cannot be answered."""
        if self._closed or not self._started:
            raise SinkError("webrtc sink is not running")
        if len(self.viewers) >= self.max_viewers:
            raise SinkError(f"this stream has its limit of {self.max_viewers} viewers")
        _check_offer(offer_sdp)
        pc = RTCPeerConnection()
        viewer = Viewer(uuid.uuid4().hex, pc)
        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            except Exception as exc:
                raise InvalidOffer(f"the SDP offer was not accepted: {exc}") from None
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
            codecs = _negotiated(pc.localDescription.sdp)
            for kind, (sender, track) in senders.items():
                codec = codecs.get(kind)
                if codec is None or (kind == "video" and codec not in VIDEO_CODECS) \
                        or (kind == "audio" and codec != OPUS):
                    # The viewer offered nothing we encode: the m-line stays unused.
                    sender.replaceTrack(None)
                    viewer.tracks.remove(track)
                    continue
                track.bind(codec)
                # Why: aiortc turns PLI/FIR into a flag only its own encode path reads.
                sender._send_keyframe = _keyframe_hook(self, codec)  # type: ignore[method-assign]
                if kind == "video":
                    _tap_rtcp(sender, self, viewer.id)
            if not viewer.tracks:
                raise InvalidOffer("the offer has no H.264, VP8 or Opus media to receive")
        except BaseException:
            await pc.close()
            raise
        self.viewers[viewer.id] = viewer
        self._viewers_total += 1

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.remove_viewer(viewer.id)

        return viewer.id, pc.localDescription.sdp

    async def remove_viewer(self, viewer_id: str) -> bool:
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        self.quality.forget(viewer_id)
        for track in viewer.tracks:
            track.stop()
        await viewer.pc.close()
        return True

    def request_keyframe(self, codec: str) -> None:
        enc = self._encoders.get(codec)
        if enc is not None:
            enc.key_requests += 1
        # An encoder not running yet starts with a keyframe anyway.

    def _join(self, track: PacketTrack) -> None:
        assert track.codec is not None
        if self._closed:
            return
        self._consumers.setdefault(track.codec, set()).add(track)
        self._update_wanted()
        self.request_keyframe(track.codec)

    def _leave(self, track: PacketTrack) -> None:
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

    def _deliver(self, out: list[tuple[str, av.Packet, bool]]) -> None:
        for codec, packet, keyframe in out:
            for track in list(self._consumers.get(codec, ())):
                track.push(packet, keyframe)

    # -- worker thread -----------------------------------------------------------------

    def _handle(self, chunk: MediaChunk) -> None:
        """One chunk, on the sink's lane (one pool thread at a time, in order)."""
        loop = self._loop
        assert loop is not None
        try:
            out = self._encode(chunk)
        except Exception as exc:
            # A broken encoder is rebuilt on the next chunk (and starts with a
            # keyframe), rather than ending the stream for every viewer.
            if self._error is None:
                log.exception("webrtc sink: encoding failed")
            self._error = exc
            self._encoders.clear()
            return
        self._frames_encoded += 1
        if out:
            try:
                loop.call_soon_threadsafe(self._deliver, out)
            except RuntimeError:  # the loop is gone: the node is stopping
                pass

    def _sync_encoders(self) -> None:
        wanted = self._wanted
        for key in [k for k in self._encoders if k not in wanted]:
            del self._encoders[key]
            if key == OPUS:
                self._audio_next = None
        bitrate = self._target[0]
        for key in wanted:
            enc = self._encoders.get(key)
            if enc is not None and (key == OPUS or enc.bitrate == bitrate):
                continue
            # New, or the bitrate moved: a fresh encoder (starting on a keyframe) rather
            # than a live change, which libx264 and libvpx via PyAV do not take.
            self._encoders[key] = _Enc(key, self._open(key, bitrate), bitrate)
            self._encoders_created += 1

    def _open(self, key: str, bitrate: int) -> VideoCodecContext | AudioCodecContext:
        if key == OPUS:
            actx = cast(AudioCodecContext, av.CodecContext.create("libopus", "w"))
            actx.sample_rate = AUDIO_RATE
            actx.layout = "mono"
            actx.format = "s16"
            actx.bit_rate = self.audio_bitrate
            actx.time_base = AUDIO_TB
            actx.options = {"application": "voip", "frame_duration": "20"}
            actx.open()
            return actx
        if key == H264:
            ctx = cast(VideoCodecContext, av.CodecContext.create("libx264", "w"))
            # Constrained Baseline at level 3.1: what aiortc and browsers negotiate
            # (profile-level-id 42e01f); no B-frames, in-band SPS/PPS before each IDR.
            ctx.profile = "Baseline"
            ctx.options = {"preset": self.x264_preset, "tune": "zerolatency", "level": "31"}
        else:
            ctx = cast(VideoCodecContext, av.CodecContext.create("libvpx", "w"))
            # aiortc's realtime VP8 settings (aiortc/codecs/vpx.py), CBR.
            ctx.qmin = 2
            ctx.qmax = 56
            ctx.options = {
                "bufsize": str(bitrate), "cpu-used": "-6", "deadline": "realtime",
                "lag-in-frames": "0", "minrate": str(bitrate),
                "maxrate": str(bitrate), "noise-sensitivity": "4",
                "overshoot-pct": "15", "partitions": "0", "static-thresh": "1",
                "undershoot-pct": "100",
            }
        ctx.width = self.width
        ctx.height = self.height
        ctx.pix_fmt = "yuv420p"
        ctx.bit_rate = bitrate
        ctx.framerate = Fraction(self.fps, 1)
        ctx.time_base = Fraction(1, self.fps)
        # Viewers ask for keyframes when they need one; a periodic one every 4 s
        # bounds how long a loss nobody reported can show.
        ctx.gop_size = self.fps * 4
        ctx.thread_count = self.threads or min(4, multiprocessing.cpu_count())
        ctx.open()
        return ctx

    def _encode(self, chunk: MediaChunk) -> list[tuple[str, av.Packet, bool]]:
        self._sync_encoders()
        out: list[tuple[str, av.Packet, bool]] = []
        video = [e for e in self._encoders.values() if e.key != OPUS]
        if video and keep_frame(chunk.index, self._target[1], self.fps):
            picture = chunk.video
            frame = to_av_frame(picture)
            if (picture.width, picture.height) != (self.width, self.height):
                frame = frame.reformat(width=self.width, height=self.height)
            frame.pts = chunk.index
            frame.time_base = Fraction(1, self.fps)
            pts90 = chunk.index * VIDEO_CLOCK // self.fps
            self._video_frames += 1
            for enc in video:
                asked = enc.key_requests  # read once: later requests wait for the next
                key_wanted = asked != enc.key_served
                enc.key_served = asked
                frame.pict_type = (av.video.frame.PictureType.I if key_wanted
                                   else av.video.frame.PictureType.NONE)
                packets = cast(VideoCodecContext, enc.ctx).encode(frame)
                if not packets:
                    continue
                data = b"".join(bytes(p) for p in packets)
                pkt = av.Packet(data)
                pkt.pts = pts90
                pkt.time_base = VIDEO_TB
                pkt.is_keyframe = any(p.is_keyframe for p in packets)
                out.append((enc.key, pkt, pkt.is_keyframe))
        opus = self._encoders.get(OPUS)
        if opus is not None:
            out.extend(self._encode_audio(opus, chunk))
        return out

    def _encode_audio(self, enc: _Enc, chunk: MediaChunk) -> list[tuple[str, av.Packet, bool]]:
        start = chunk.index * self.samples_per_frame
        if self._audio_next is not None and start < self._audio_next:
            return []  # a repeated index: its audio was already sent
        pcm = np.ascontiguousarray(chunk.audio, dtype=np.int16).reshape(1, -1)
        aframe = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        aframe.sample_rate = AUDIO_RATE
        # The pts is the chunk's place on the stream clock, so a gap left by dropped
        # chunks stays a gap in RTP time and later audio stays under its picture.
        aframe.pts = start
        aframe.time_base = AUDIO_TB
        self._audio_next = start + pcm.shape[1]
        out: list[tuple[str, av.Packet, bool]] = []
        # PyAV re-blocks into the encoder's 20 ms frames; libopus stamps each packet
        # with the pts of its first input sample less its 6.5 ms look-ahead.
        for p in cast(AudioCodecContext, enc.ctx).encode(aframe):
            pkt = av.Packet(bytes(p))
            pkt.pts = p.pts
            pkt.time_base = AUDIO_TB
            out.append((OPUS, pkt, True))
        return out


def _tap_rtcp(sender: RTCRtpSender, sink: WebRtcSink, viewer_id: str) -> None:
    """Let the sink see this sender's RTCP before aiortc handles it."""
    original: Callable[[Any], Awaitable[None]] = sender._handle_rtcp_packet

    async def handle(packet: Any) -> None:
        try:
            sink._on_feedback(viewer_id, sender._ssrc, packet)
        except Exception:  # feedback must never break the viewer's RTCP handling
            log.exception("webrtc sink: bad RTCP feedback from viewer %s", viewer_id)
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


def _keyframe_hook(sink: WebRtcSink, codec: str) -> Callable[[], None]:
    def hook() -> None:
        sink.request_keyframe(codec)
    return hook


def _check_offer(sdp: str) -> None:
    if not sdp.lstrip().startswith("v=0"):
        raise InvalidOffer("the body is not an SDP offer (it must start with v=0)")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:
        raise InvalidOffer(f"the SDP offer does not parse: {exc}") from None
    if not parsed.media:
        raise InvalidOffer("the offer has no media sections")


def _negotiated(answer_sdp: str) -> dict[str, str]:
    """The codec each kind will be sent with: the first one in the answer's m-line,
    which is the one aiortc's sender picks."""
    found: dict[str, str] = {}
    for media in SessionDescription.parse(answer_sdp).media:
        if media.kind in found or media.port == 0:
            continue
        codecs = [c for c in media.rtp.codecs if c.name.lower() != "rtx"]
        if codecs:
            found[media.kind] = codecs[0].mimeType.lower()
    return found
