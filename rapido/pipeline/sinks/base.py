"""The sink seam: where a stream's frames leave the process."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from rapido.pipeline.media import MediaChunk
from rapido.pipeline.quality import Quality

#: How much lower than the event loop an encoder thread runs (Linux thread nice value).
ENCODER_NICE = 10


def lower_thread_priority(nice: int = ENCODER_NICE) -> None:
    """Make the calling thread yield the CPU to the event loop and the model worker.

    With more runnable encoder threads than cores, the kernel shares the cores evenly,
    so the loop thread (the clock, every stream's tick) waits behind a dozen encoders
    and frames leave late while encoders still have slack (their queues hold a second).
    A nice thread takes what the loop leaves. Linux only; elsewhere a no-op."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        tid = threading.get_native_id()
        with contextlib.suppress(OSError):
            # Relative to what the thread inherited (a niced node stays below its loop).
            os.setpriority(os.PRIO_PROCESS, tid,
                           min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


class SinkError(RuntimeError):
    """A sink could not be opened (bad path, encoder unavailable, ...)."""


class SinkDetail(Protocol):
    """The part of a sink's stats only its kind has (a frozen dataclass next to the
    sink). It lays out the sink's whole ``stats.sink`` JSON, common fields included, so
    each kind keeps its own key names and order on the wire."""

    def json(self, stats: SinkStats) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class SinkStats:
    """What every sink reports (``Sink.stats()``); ``json()`` is ``stats.sink`` in the
    HTTP API."""

    kind: str
    #: Frames that have left the sink (its ``playout_frames``).
    frames: int
    #: Chunks dropped because the sink fell behind (its encoder or its send queue).
    dropped: int
    interrupts: int
    detail: SinkDetail
    #: Pictures the sink's own encoders encoded (None: it runs none in this process).
    encoded: int | None = None
    #: What adaptive quality has chosen (publishers only); its score counts bitrate and
    #: frame rate alone.
    quality: Quality | None = None
    #: The publisher's score: ``quality.score`` less recent stutter (what the JSON
    #: shows as ``quality.score``, and ``Adaptive.quality_score()``).
    quality_score: float | None = None
    #: The sink's last failure, ``"Type: message"`` (None: none).
    error: str | None = None

    def json(self) -> dict[str, Any]:
        return self.detail.json(self)

    def quality_json(self) -> dict[str, Any] | None:
        """``quality`` as the JSON shows it: the publisher's score in place of the
        controller's."""
        if self.quality is None:
            return None
        score = self.quality.score if self.quality_score is None else self.quality_score
        return {**self.quality.as_json(), "score": round(score, 3)}


def error_text(error: BaseException | None) -> str | None:
    """A failure as the stats show it."""
    return None if error is None else f"{type(error).__name__}: {error}"


@runtime_checkable
class Sink(Protocol):
    """Takes one :class:`MediaChunk` per frame, in order, from the stream's clock.

    ``write`` is called on the event loop and must return at once: a sink that does
    heavy work (encoding, network) hands it to its own thread or task. The engine's
    clock paces the stream at real time, so a sink only has to keep up.
    """

    kind: str

    async def start(self) -> None: ...

    def write(self, chunk: MediaChunk) -> None: ...

    def interrupt(self) -> float:
        """Drop whatever is queued but not yet played out (barge-in). Returns the
        milliseconds of speech (chunks ``speaking``) it dropped unplayed, which the
        session takes off the position it reports as played."""
        ...

    @property
    def playout_frames(self) -> int:
        """Frames that have left this sink (played out, encoded, or counted)."""
        ...

    def stats(self) -> SinkStats: ...

    def audience(self) -> int:
        """Who watches this stream live now (WHEP viewers, LiveKit subscribers): while
        anyone does, the session is not idle. 0 for sinks nobody watches (null, record)."""
        ...

    async def aclose(self) -> None:
        """Flush and finalise; idempotent."""
        ...


@runtime_checkable
class Adaptive(Protocol):
    """A sink that adapts its quality to the node's load: the publishers (webrtc,
    LiveKit). The engine feeds it a load sample once a second and reads its score into
    ``video_quality_score``."""

    def adapt(self, load: float, now: float) -> None:
        """One load sample: ``load`` is the node's (1.0 at its limit), ``now`` the
        monotonic time it was taken."""
        ...

    def quality_score(self) -> float:
        """1.0 at full quality; lower for a lower bitrate or frame rate, or stutter."""
        ...
