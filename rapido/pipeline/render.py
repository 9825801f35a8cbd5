"""The renderer seam: how a stream's frame job gets its picture.

A stream makes one :class:`FrameJob` per clock tick, in order. A renderer fills
``job.video`` either at once (idle frames, silence) or later (speaking frames through the
shared, batched model), then calls ``job.done()``; the stream hands finished jobs to its
sink strictly in order, so a frame that waits for the model holds back the frames after
it and audio and video never part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rapido.gpu.avatar import Avatar
from rapido.pipeline.media import VideoFrame


@dataclass(slots=True, eq=False)
class FrameJob:
    index: int  # frame number on the stream's clock
    due: float  # loop time the frame was scheduled for
    audio: np.ndarray  # this frame's audio at AUDIO_RATE
    speaking: bool
    avatar: Avatar
    lookahead: np.ndarray | None = None  # audio after this frame, for models that need it
    video: VideoFrame | None = None
    degraded: bool = False  # the picture is a fallback (model error or overload)
    on_done: Callable[[FrameJob], None] | None = field(default=None, repr=False)

    def done(self) -> None:
        if self.on_done is not None:
            self.on_done(self)


class FrameRenderer(Protocol):
    #: Samples of audio after the frame the renderer wants in ``job.lookahead``.
    lookahead_samples: int

    def submit(self, job: FrameJob) -> None:
        """Fill ``job.video`` now or later, then call ``job.done()`` exactly once."""
        ...


class IdleRenderer:
    """Every frame is the avatar's idle frame: silence costs no model time.

    Until the model layer lands this serves speaking frames too (the mouth does not move)."""

    lookahead_samples = 0

    def submit(self, job: FrameJob) -> None:
        job.video = job.avatar.idle_frame(job.index)
        job.done()
