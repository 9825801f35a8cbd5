"""The shared encoders: one per codec in use for a stream, however many viewers.

aiortc's ``RTCRtpSender`` normally runs one encoder per peer connection. Here a
stream's :class:`SharedEncoders` runs one video encoder per codec in use (H.264 and/or
VP8) plus one Opus encoder, and every viewer's track is handed the same ``av.Packet``s
(:mod:`rapido.webrtc.track`).

Everything here runs on the sink's lane of the node's encoder pool (one thread at a
time, in order), except the two loop-side reads documented as such
(:meth:`SharedEncoders.counts`, :meth:`SharedEncoders.request_keyframe`).

Timestamps: video pts is ``index`` frames at 90 kHz, audio pts is ``index * samples
per frame`` at 48 kHz, so the two streams of one chunk carry the same instant.

Frame rate: below the source rate only evenly spaced pictures are encoded (no re-open:
libx264 keeps each picture's bits, so the stream's bitrate falls with its frame rate);
audio is never thinned. RTP time still comes from the frame's index, so a thinned
stream stays in sync with its audio. A bitrate change re-opens the video encoders,
which starts them on a keyframe.
"""

from __future__ import annotations

import fractions
import multiprocessing
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, cast

import av
import numpy as np
from av.audio.codeccontext import AudioCodecContext
from av.video.codeccontext import VideoCodecContext

from rapido.pipeline.media import AUDIO_RATE, MediaChunk
from rapido.pipeline.quality import keep_frame
from rapido.pipeline.sinks.frames import to_av_frame

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

#: What one chunk encodes to: (codec key, packet, keyframe) in send order.
Encoded = list[tuple[str, av.Packet, bool]]


@dataclass(slots=True)
class SharedEncoder:
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


class SharedEncoders:
    """A stream's encoders, opened and closed to match the codecs its viewers want."""

    def __init__(self, *, width: int, height: int, fps: int, samples_per_frame: int,
                 audio_bitrate: int, x264_preset: str, threads: int) -> None:
        self.width = width
        self.height = height
        self.fps = fps
        self.samples_per_frame = samples_per_frame
        self.audio_bitrate = audio_bitrate
        self.x264_preset = x264_preset
        self.threads = threads
        self._encoders: dict[str, SharedEncoder] = {}
        self._audio_next: int | None = None
        # Counters, written by the worker only.
        self.created = 0
        self.video_frames = 0  # pictures encoded (fewer than chunks when thinned)

    # -- read from the event loop ------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Encoders running, by codec: at most one each, however many viewers."""
        # list() copies the worker's dict in one step (atomic under the GIL).
        return {key: 1 for key in sorted(list(self._encoders))}

    def request_keyframe(self, codec: str) -> None:
        enc = self._encoders.get(codec)
        if enc is not None:
            enc.key_requests += 1
        # An encoder not running yet starts with a keyframe anyway.

    def __getitem__(self, codec: str) -> SharedEncoder:
        return self._encoders[codec]

    def __bool__(self) -> bool:
        return bool(self._encoders)

    # -- the worker --------------------------------------------------------------------

    def clear(self) -> None:
        """Let go of every encoder (a broken one is rebuilt, on a keyframe, next chunk)."""
        self._encoders.clear()

    def encode(self, chunk: MediaChunk, wanted: frozenset[str], bitrate: int,
               fps: Fraction) -> Encoded:
        """Open and close encoders to match ``wanted`` at ``bitrate``, then encode
        ``chunk``: its picture if ``fps`` keeps it, its audio always."""
        self._sync(wanted, bitrate)
        out: Encoded = []
        video = [e for e in self._encoders.values() if e.key != OPUS]
        if video and keep_frame(chunk.index, fps, self.fps):
            out.extend(self._encode_video(video, chunk))
        opus = self._encoders.get(OPUS)
        if opus is not None:
            out.extend(self._encode_audio(opus, chunk))
        return out

    def _sync(self, wanted: frozenset[str], bitrate: int) -> None:
        for key in [k for k in self._encoders if k not in wanted]:
            del self._encoders[key]
            if key == OPUS:
                self._audio_next = None
        for key in wanted:
            enc = self._encoders.get(key)
            if enc is not None and (key == OPUS or enc.bitrate == bitrate):
                continue
            # New, or the bitrate moved: a fresh encoder (starting on a keyframe) rather
            # than a live change, which libx264 and libvpx via PyAV do not take.
            self._encoders[key] = SharedEncoder(key, self._open(key, bitrate), bitrate)
            self.created += 1

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

    def _encode_video(self, video: list[SharedEncoder], chunk: MediaChunk) -> Encoded:
        picture = chunk.video
        frame = to_av_frame(picture)
        if (picture.width, picture.height) != (self.width, self.height):
            frame = frame.reformat(width=self.width, height=self.height)
        frame.pts = chunk.index
        frame.time_base = Fraction(1, self.fps)
        pts90 = chunk.index * VIDEO_CLOCK // self.fps
        self.video_frames += 1
        out: Encoded = []
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
        return out

    def _encode_audio(self, enc: SharedEncoder, chunk: MediaChunk) -> Encoded:
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
        out: Encoded = []
        # PyAV re-blocks into the encoder's 20 ms frames; libopus stamps each packet
        # with the pts of its first input sample less its 6.5 ms look-ahead.
        for p in cast(AudioCodecContext, enc.ctx).encode(aframe):
            pkt = av.Packet(bytes(p))
            pkt.pts = p.pts
            pkt.time_base = AUDIO_TB
            out.append((OPUS, pkt, True))
        return out
