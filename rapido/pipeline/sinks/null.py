"""A sink that only counts: the output end of benchmarks and load tests.

Benchmarks run 100+ streams at 25 fps on one loop, so ``write`` does a few integer
additions and one deque append; the delivered-fps figure is worked out only when
``stats()`` asks for it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rapido.pipeline.media import MediaChunk
from rapido.pipeline.sinks.base import SinkStats

#: Long enough to smooth over the loop's scheduling jitter, short enough that a stall
#: shows up in the next stats scrape.
DEFAULT_FPS_WINDOW_S = 2.0


@dataclass(frozen=True, slots=True)
class NullStats:
    """The null sink's own part of :class:`SinkStats`."""

    audio_samples: int
    #: Frames delivered per second over the recent window.
    fps: float
    speaking_frames: int

    def json(self, stats: SinkStats) -> dict[str, Any]:
        return {
            "kind": stats.kind,
            "frames": stats.frames,
            "audio_samples": self.audio_samples,
            "fps": self.fps,
            "speaking_frames": self.speaking_frames,
            "interrupts": stats.interrupts,
        }


class NullSink:
    """Discards media, keeping counts and the recent delivery rate."""

    kind = "null"

    def __init__(
        self,
        *,
        fps_window_s: float = DEFAULT_FPS_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fps_window_s <= 0:
            raise ValueError(f"fps_window_s must be positive, got {fps_window_s}")
        self._window = fps_window_s
        # Injectable so tests can check the rate arithmetic without sleeping.
        self._clock = clock
        self._times: deque[float] = deque()
        self.frames = 0
        self.audio_samples = 0
        self.speaking_frames = 0
        self.interrupts = 0
        self.closed = False

    async def start(self) -> None:
        return None

    def write(self, chunk: MediaChunk) -> None:
        now = self._clock()
        times = self._times
        times.append(now)
        # Trimming here keeps the deque at about window * fps entries, so memory stays
        # flat however long the stream runs and however rarely stats() is called.
        horizon = now - self._window
        while times[0] < horizon:
            times.popleft()
        self.frames += 1
        self.audio_samples += len(chunk.audio)
        if chunk.speaking:
            self.speaking_frames += 1

    def interrupt(self) -> float:
        # Nothing is buffered, so there is nothing to drop; the count is still useful
        # to check that barge-in reached the sink.
        self.interrupts += 1
        return 0.0

    @property
    def playout_frames(self) -> int:
        return self.frames

    def audience(self) -> int:
        return 0

    def fps(self) -> float:
        """Frames per second delivered over the last ``fps_window_s`` seconds.

        Measured between the first and last write in the window, so a steady stream
        reads exactly its rate instead of being biased low by a partly filled window.
        Time since the last write counts once it exceeds the usual gap, so a stalled
        stream decays towards 0 rather than reporting its last rate forever.
        """
        now = self._clock()
        times = self._times
        horizon = now - self._window
        while times and times[0] < horizon:
            times.popleft()
        n = len(times)
        if n < 2:
            return 0.0
        span = times[-1] - times[0]
        gap = span / (n - 1)
        span += max(0.0, (now - times[-1]) - gap)
        # A burst written within one clock tick has no measurable rate.
        return (n - 1) / span if span > 0 else 0.0

    def stats(self) -> SinkStats:
        return SinkStats(
            kind=self.kind, frames=self.frames, dropped=0, interrupts=self.interrupts,
            detail=NullStats(audio_samples=self.audio_samples, fps=self.fps(),
                             speaking_frames=self.speaking_frames))

    async def aclose(self) -> None:
        self.closed = True
