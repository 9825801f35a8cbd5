"""The LiveKit sink's part of its :class:`~rapido.pipeline.sinks.base.SinkStats`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rapido.livekit.linkstats import VideoLink
from rapido.pipeline.sinks.base import SinkStats


@dataclass(frozen=True, slots=True)
class LiveKitStats:
    """The LiveKit sink's own part of :class:`SinkStats` (``frames`` is pictures
    captured or thinned, ``dropped`` chunks dropped from the backlog)."""

    state: str
    reason: str | None
    url: str | None
    retries: int
    connects: int
    last_connect_s: float | None
    frames_captured: int
    audio_frames_captured: int
    frames_unpublished: int
    discarded_frames: int
    pending_frames: int
    video_waiting: int
    audio_queued_ms: float
    video_codec: str
    frames_thinned: int
    #: libwebrtc's view of the video link (None until it has sent video).
    link: VideoLink | None
    stats_errors: int

    def json(self, stats: SinkStats) -> dict[str, Any]:
        return {
            "kind": stats.kind,
            "state": self.state,
            "reason": self.reason,
            "url": self.url,
            "retries": self.retries,
            "connects": self.connects,
            "last_connect_s": self.last_connect_s,
            "frames_captured": self.frames_captured,
            "audio_frames_captured": self.audio_frames_captured,
            "frames_unpublished": self.frames_unpublished,
            "dropped_backlog": stats.dropped,
            "discarded_frames": self.discarded_frames,
            "pending_frames": self.pending_frames,
            "video_waiting": self.video_waiting,
            "audio_queued_ms": self.audio_queued_ms,
            "interrupts": stats.interrupts,
            "video_codec": self.video_codec,
            "frames_thinned": self.frames_thinned,
            "quality": stats.quality_json(),
            "link": None if self.link is None else self.link.as_json(),
            "stats_errors": self.stats_errors,
        }
