"""Record one session to an MP4 file: H.264 video plus AAC mono audio.

All PyAV work happens on the recorder's lane of an :class:`EncoderPool` (the node's
few shared encoder threads; one thread at a time per lane, in order); the event loop
only puts chunks on the bounded lane, so a slow disk or an encoder that falls behind
can never stall the stream clock.

The file is a fragmented MP4 cut at every keyframe, and a keyframe is forced once a
second, so a crash (or a copy taken while recording) leaves a file that plays up to
the last completed second. Each completed fragment is fsynced as it is cut, and the
file again when it is finalised, so a crash of the host itself loses at most the
second being recorded (and, if it strikes while ``moov`` is not yet written, the
first second). ``delay_moov`` holds the ``moov`` box back until the first
fragment is cut: by then the AAC encoder's priming delay is known and the muxer writes
an edit list that hides it, so audio lines up with video in players (without it audio
would start 1024 samples, ~21 ms, late). The cost is that the file is empty on disk
for the first second.

Queue overflow policy: when the encoder cannot keep up, ``write`` drops the whole
chunk, picture and audio together, and nothing of it reaches the file. The worker
then keeps the two tracks locked on the frame index: video pts is the frame index, so
the previous picture is simply shown for longer, and the audio gap is filled with
silence so that every later sample stays under the picture it was spoken with. (Just
skipping the audio would compress the audio timeline and shift every later frame's
lip-sync by 40 ms per drop.) Decoded video therefore has ``frames_written`` frames
and the audio lasts as long as the video.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import OutputContainer
from av.video.stream import VideoStream

from rapido.pipeline.media import AUDIO_RATE, MediaChunk, frame_samples
from rapido.pipeline.sinks.base import SinkError, SinkStats, error_text
from rapido.pipeline.sinks.frames import to_av_frame
from rapido.pipeline.sinks.pool import EncoderPool, Lane

log = logging.getLogger(__name__)

#: ``frag_keyframe``: cut a fragment at each video keyframe (GOP = 1 s), the unit a
#: crash can lose. ``empty_moov``: no sample tables in the header, so nothing has to
#: be rewritten at the end. ``default_base_moof``: fragment offsets relative to their
#: own moof, which is what browsers' MSE and most players expect.
MOVFLAGS: Final = "frag_keyframe+empty_moov+default_base_moof+delay_moov"

#: Silence to fill a gap left by dropped chunks is written in blocks of at most this
#: many samples, so a long jump in frame index does not allocate one huge array.
_SILENCE_BLOCK: Final = AUDIO_RATE


@dataclass(frozen=True, slots=True)
class RecordStats:
    """The recorder's own part of :class:`SinkStats` (``frames`` is frames written)."""

    path: str
    #: Includes silence written in place of dropped chunks' audio.
    audio_samples_written: int
    #: Chunks ignored because the recorder was not running or had failed.
    discarded_frames: int
    out_of_order_frames: int
    queue_depth: int
    #: The file's size on disk now.
    bytes: int

    def json(self, stats: SinkStats) -> dict[str, Any]:
        return {
            "kind": stats.kind,
            "path": self.path,
            "frames_written": stats.frames,
            "audio_samples_written": self.audio_samples_written,
            "dropped_frames": stats.dropped,
            "discarded_frames": self.discarded_frames,
            "out_of_order_frames": self.out_of_order_frames,
            "queue_depth": self.queue_depth,
            "bytes": self.bytes,
            "interrupts": stats.interrupts,
            "error": stats.error,
        }


class RecorderSink:
    """Writes a session's audio and video to ``path`` as a fragmented MP4."""

    kind = "record"

    def __init__(
        self,
        path: Path,
        *,
        width: int,
        height: int,
        fps: int,
        audio_rate: int = AUDIO_RATE,
        preset: str = "ultrafast",
        crf: int = 23,
        max_queue: int = 250,
        audio_bitrate: int = 64_000,
        threads: int = 0,
        pool: EncoderPool | None = None,
    ) -> None:
        """``audio_rate`` is the rate of the chunks' audio and of the AAC track (no
        resampling). ``threads`` is libx264's thread count; 0 lets libx264 choose, which
        is per-core and may be too many when dozens of recorders share a machine.
        ``pool`` is the node's shared encoder pool; without one the recorder runs a
        one-thread pool of its own."""
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            # yuv420p halves both chroma dimensions; libx264 rejects odd sizes.
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51, got {crf}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.path = Path(path)
        self.width = width
        self.height = height
        self.fps = fps
        self.audio_rate = audio_rate
        self.samples_per_frame = frame_samples(fps, audio_rate)
        self.preset = preset
        self.crf = crf
        self.audio_bitrate = audio_bitrate
        self.threads = threads
        self._video_tb = Fraction(1, fps)
        self._audio_tb = Fraction(1, audio_rate)

        self._max_queue = max_queue
        self._pool = pool
        self._own_pool: EncoderPool | None = None
        self._lane: Lane | None = None
        self._container: OutputContainer | None = None
        self._vstream: VideoStream | None = None
        self._astream: AudioStream | None = None

        self._started = False
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None

        # Written by the event loop only.
        self._dropped = 0
        self._dropped_since_log = 0
        self._last_drop_log = -1e9
        self._discarded = 0
        self._warned_discard = False
        self._interrupts = 0

        # Written by the worker only; the loop just reads them (int reads are atomic).
        self._bytes = 0  # on disk and synced, as of the last fragment (no stat() on the loop)
        self._fd: int | None = None  # a read-only descriptor of the file, for fsync
        self._frames_written = 0
        self._audio_written = 0
        self._out_of_order = 0
        self._base_index: int | None = None
        self._last_rel = -1
        self._error: BaseException | None = None

    # -- event loop side -------------------------------------------------------------

    async def start(self) -> None:
        """Create the parent folders, open the file and both encoders, start the worker.

        Opening everything here (rather than on the first frame) means a bad path or an
        unusable encoder setting fails the session at once, with the path in the message.
        """
        if self._closed:
            raise SinkError(f"recorder for {self.path} is closed")
        if self._started:
            return
        try:
            await asyncio.to_thread(self._open)
        except Exception as exc:
            raise SinkError(f"cannot record to {self.path}: {exc}") from exc
        pool = self._pool
        if pool is None:
            pool = self._own_pool = EncoderPool(1, name="rapido-recorder")
        try:
            self._lane = pool.lane(self._handle, max_queue=self._max_queue,
                                   name=f"recorder {self.path.name}")
        except SinkError:  # the node is stopping: do not leave the file open
            await asyncio.to_thread(self._close_container)
            raise
        self._started = True

    def write(self, chunk: MediaChunk) -> None:
        """Queue ``chunk`` for encoding; never blocks and never raises for recording
        problems, because a failed recording must not stop the live stream."""
        if not self._started or self._closed or self._error is not None or self._lane is None:
            self._discard()
            return
        if not self._lane.put(chunk):
            self._dropped += 1
            self._dropped_since_log += 1
            now = time.monotonic()
            if now - self._last_drop_log >= 1.0:
                log.warning(
                    "recorder %s: encoder behind, dropped %d frame(s) with their audio (%d in all)",
                    self.path,
                    self._dropped_since_log,
                    self._dropped,
                )
                self._last_drop_log = now
                self._dropped_since_log = 0

    def _discard(self) -> None:
        self._discarded += 1
        if not self._warned_discard:
            self._warned_discard = True
            why = (
                "the encoder failed"
                if self._error is not None
                else "it is closed"
                if self._closed
                else "it is not started"
            )
            log.warning("recorder %s: ignoring frames because %s", self.path, why)

    def interrupt(self) -> float:
        # A recording keeps what was played out; queued chunks were already delivered
        # to the viewer, so they stay in the file too.
        self._interrupts += 1
        return 0.0

    @property
    def playout_frames(self) -> int:
        return self._frames_written

    def audience(self) -> int:
        return 0

    @property
    def dropped_frames(self) -> int:
        return self._dropped

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stats(self) -> SinkStats:
        size = self._bytes
        written = self._frames_written
        return SinkStats(
            kind=self.kind, frames=written, dropped=self._dropped,
            interrupts=self._interrupts, encoded=written, error=error_text(self._error),
            detail=RecordStats(
                path=str(self.path), audio_samples_written=self._audio_written,
                discarded_frames=self._discarded, out_of_order_frames=self._out_of_order,
                queue_depth=self._lane.qsize() if self._lane is not None else 0,
                bytes=size))

    async def aclose(self) -> None:
        """Encode everything queued, flush the encoders and finalise the file.

        Idempotent; concurrent callers all wait for the same finalisation. Never raises
        for encoder failures (those are logged and kept in ``stats().error``). If
        ``start`` failed nothing is written; if no frame was written the file is a
        valid MP4 with no samples.
        """
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.ensure_future(self._finish())
        # Shielded so that a caller being cancelled does not abandon a half-written
        # trailer; the finalisation carries on in its thread either way.
        await asyncio.shield(self._close_task)

    async def _finish(self) -> None:
        lane = self._lane
        if lane is not None:
            # Nothing is put after _closed: encode what is queued, then finalise (the
            # lane is idle, so no pool thread touches the container any more).
            await asyncio.to_thread(lane.join)
            await asyncio.to_thread(self._finalise)
        elif self._container is not None:
            # start() was cancelled after opening but before the lane existed.
            await asyncio.to_thread(self._close_container)
        if self._own_pool is not None:
            await asyncio.to_thread(self._own_pool.close)

    # -- worker thread side ----------------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(
            str(self.path),
            mode="w",
            format="mp4",
            options={"movflags": MOVFLAGS, "flush_packets": "1"},
        )
        try:
            vstream = container.add_stream(
                "libx264",
                rate=self.fps,
                options={"preset": self.preset, "tune": "zerolatency", "crf": str(self.crf)},
            )
            vstream.width = self.width
            vstream.height = self.height
            vstream.pix_fmt = "yuv420p"
            vctx = vstream.codec_context
            vctx.time_base = self._video_tb
            vctx.gop_size = self.fps  # one keyframe, hence one fragment, per second
            vctx.thread_count = self.threads

            astream = container.add_stream("aac", rate=self.audio_rate)
            astream.layout = "mono"
            astream.bit_rate = self.audio_bitrate
            astream.codec_context.time_base = self._audio_tb

            # Opens both encoders and the file now, so their errors surface in start().
            container.start_encoding()
        except BaseException:
            _close_quietly(container, self.path)
            raise
        self._container = container
        self._vstream = vstream
        self._astream = astream
        self._fd = os.open(self.path, os.O_RDONLY)

    def _handle(self, chunk: MediaChunk) -> None:
        """One chunk, on the recorder's lane."""
        if self._error is not None:
            # Keep draining so that aclose() and write() never wait on a dead encoder;
            # what is left is lost anyway.
            return
        try:
            self._encode(chunk)
        except Exception as exc:
            self._fail("encoding", exc)

    def _encode(self, chunk: MediaChunk) -> None:
        assert self._container is not None
        assert self._vstream is not None and self._astream is not None
        if self._base_index is None:
            # The file starts at 0 even if the recorder joined a running stream.
            self._base_index = chunk.index
        rel = chunk.index - self._base_index
        if rel <= self._last_rel:
            # pts must increase or the muxer fails the whole file; a repeated or
            # backwards index is an upstream bug, and skipping it is the least harm.
            self._out_of_order += 1
            log.warning(
                "recorder %s: skipping frame %d, not after %d",
                self.path,
                chunk.index,
                self._last_rel + self._base_index,
            )
            return

        picture = chunk.video
        vframe = to_av_frame(picture)
        if (picture.width, picture.height) != (self.width, self.height):
            vframe = vframe.reformat(width=self.width, height=self.height)
        vframe.pts = rel
        vframe.time_base = self._video_tb

        # Dropped chunks leave a gap in the index; fill it with silence so the audio
        # timeline stays locked to the video pts (see the module docstring).
        target = rel * self.samples_per_frame
        while self._audio_written < target:
            n = min(target - self._audio_written, _SILENCE_BLOCK)
            self._encode_audio(np.zeros(n, dtype=np.int16))

        packets = self._vstream.encode(vframe)
        self._container.mux(packets)
        self._encode_audio(chunk.audio)
        self._last_rel = rel
        self._frames_written += 1
        if any(p.is_keyframe for p in packets):
            # The muxer wrote out the fragment before this keyframe: make it durable.
            self._sync()

    def _sync(self) -> None:
        if self._fd is None:
            return
        try:
            os.fsync(self._fd)
            self._bytes = os.fstat(self._fd).st_size
        except OSError as exc:  # a full or failing disk: say so, keep recording
            log.warning("recorder %s: fsync failed: %s", self.path, exc)

    def _encode_audio(self, samples: np.ndarray) -> None:
        assert self._container is not None and self._astream is not None
        pcm = np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1)
        aframe = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        aframe.sample_rate = self.audio_rate
        aframe.pts = self._audio_written
        aframe.time_base = self._audio_tb
        # PyAV re-blocks into the encoder's 1024-sample frames and converts to fltp.
        self._container.mux(self._astream.encode(aframe))
        self._audio_written += pcm.shape[1]

    def _finalise(self) -> None:
        container = self._container
        if container is None:
            return
        if self._error is None:
            try:
                assert self._vstream is not None and self._astream is not None
                container.mux(self._vstream.encode(None))
                container.mux(self._astream.encode(None))
            except Exception as exc:
                self._fail("flushing the encoders", exc)
        self._close_container()

    def _close_container(self) -> None:
        container, self._container = self._container, None
        if container is None:
            return
        try:
            container.close()
        except Exception as exc:
            self._fail("closing the file", exc)
        self._sync()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _fail(self, what: str, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        log.error(
            "recorder %s: %s failed, recording stopped: %s", self.path, what, exc, exc_info=exc
        )


def _close_quietly(container: OutputContainer, path: Path) -> None:
    try:
        container.close()
    except Exception:
        log.debug("recorder %s: error closing after a failed open", path, exc_info=True)
