"""The media units every stage agrees on: the audio clock and the video frame.

Audio is the master clock. Inside the pipeline all audio is mono s16 at
``AUDIO_RATE``; video frame ``n`` covers audio ``[n * frame_ms, (n + 1) * frame_ms)``
and carries that timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Internal audio rate. 48 kHz is what WebRTC (Opus) and LiveKit publish natively, so
#: output sinks never resample; the model's 16 kHz features are derived from it.
AUDIO_RATE = 48_000

DEFAULT_FPS = 25
DEFAULT_WIDTH = 854
DEFAULT_HEIGHT = 480


def frame_samples(fps: int, rate: int = AUDIO_RATE) -> int:
    """Audio samples covered by one video frame; rejects rates that do not divide evenly."""
    if fps <= 0 or rate % fps:
        raise ValueError(f"fps {fps} does not divide the audio rate {rate}")
    return rate // fps


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One I420 picture. ``data`` is ``(height * 3 // 2, width)`` uint8: the Y plane,
    then U and V (each ``height/2 x width/2``) packed row after row, the layout that
    ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` takes. Idle frames are shared
    between streams, so the array is read-only and sinks must never write into it."""

    data: np.ndarray
    width: int
    height: int

    @property
    def y(self) -> np.ndarray:
        return self.data[: self.height]


@dataclass(frozen=True, slots=True)
class MediaChunk:
    """What a stream hands its sink once per frame: picture and audio share ``index``."""

    index: int  # video frame number since the stream started
    video: VideoFrame
    audio: np.ndarray  # int16, exactly one frame's worth of samples at AUDIO_RATE
    speaking: bool

    def pts_ms(self, fps: int) -> int:
        return self.index * 1000 // fps
