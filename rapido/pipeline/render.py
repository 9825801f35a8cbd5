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
from typing import Any, Protocol

import numpy as np

from rapido.pipeline.avatar import Avatar
from rapido.pipeline.media import VideoFrame


@dataclass(slots=True, eq=False)
class FrameJob:
    index: int  # frame number on the stream's clock
    due: float  # loop time the frame was scheduled for
    audio: np.ndarray  # this frame's audio at AUDIO_RATE
    speaking: bool
    avatar: Avatar
    stream: str = ""  # the session this frame belongs to
    utterance: int | None = None  # the utterance whose speech this frame carries
    utt_pos: int = 0  # where this frame's speech starts inside its utterance (samples)
    real_samples: int = 0  # speech samples in ``audio`` (the rest is padding/silence)
    # Source samples that speech stands for: ``real_samples`` unless time-stretched.
    source_samples: int = 0
    lookahead: np.ndarray | None = None  # speech after this frame, for models that need it
    utt_complete: bool = False  # ``lookahead`` reaches the utterance's end
    video: VideoFrame | None = None
    degraded: bool = False  # the picture is a fallback (model error or overload)
    events: list[Any] = field(default_factory=list)  # playback events this frame carries
    on_done: Callable[[FrameJob], None] | None = field(default=None, repr=False)

    def done(self) -> None:
        if self.on_done is not None:
            self.on_done(self)


class FrameRenderer(Protocol):
    #: Samples of audio after the frame the renderer wants in ``job.lookahead``.
    lookahead_samples: int

    def prepare(self, avatar: Avatar) -> None:
        """Precompute what frames of ``avatar`` need (slow; called off the event loop
        before the node is ready)."""
        ...

    def submit(self, job: FrameJob) -> None:
        """Fill ``job.video`` now or later, then call ``job.done()`` exactly once."""
        ...

    def close_stream(self, stream: str) -> None:
        """Forget per-stream state (the stream ended)."""
        ...

    def info(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class IdleRenderer:
    """Every frame is the avatar's idle frame: silence costs no model time. With
    ``model = none`` it serves speaking frames too (the mouth does not move)."""

    lookahead_samples = 0

    def prepare(self, avatar: Avatar) -> None:
        pass

    def submit(self, job: FrameJob) -> None:
        job.video = job.avatar.idle_frame(job.index)
        job.done()

    def close_stream(self, stream: str) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"renderer": "idle", "model": None}

    async def aclose(self) -> None:
        pass
