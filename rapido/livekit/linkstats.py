"""What libwebrtc inside the LiveKit SDK says about a publisher's video link.

The SDK runs its own congestion control (transport-cc with the SFU): it decides the
encoder's target bitrate and, when it cannot send more, reports why
(``qualityLimitationReason``). Nothing of that reaches rapido's own
:class:`~rapido.pipeline.quality.QualityController` unless it is read from the
session's WebRTC stats; :func:`video_link` turns the publisher's stats (real
``livekit.rtc`` protobuf messages, from ``Room.get_rtc_stats()``) into one summary.
Pure, so it is tested on the SDK's own message types without a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from livekit.rtc._proto import stats_pb2

#: libwebrtc's reasons, worst first: the one a link reports is its worst layer's.
_REASONS: Final = {
    stats_pb2.LIMITATION_BANDWIDTH: "bandwidth",
    stats_pb2.LIMITATION_CPU: "cpu",
    stats_pb2.LIMITATION_OTHER: "other",
}


@dataclass(frozen=True, slots=True)
class VideoLink:
    """One published video track's sending side, as libwebrtc reports it."""

    #: Bits/s libwebrtc's bandwidth allocation gives the whole video stream. libwebrtc
    #: copies the stream's target into every simulcast layer's entry, so it is read
    #: once (the largest), never summed.
    target_bitrate: int
    #: "bandwidth", "cpu", "other", or None when nothing limits it (the worst layer's).
    limitation: str | None
    #: Layers sending pictures (1 without simulcast).
    layers: int
    #: The largest sending layer's encoded frame rate and picture size.
    fps: float
    width: int
    height: int

    def as_json(self) -> dict[str, object]:
        return {"target_bitrate": self.target_bitrate, "limitation": self.limitation,
                "layers": self.layers, "fps": round(self.fps, 1),
                "size": f"{self.width}x{self.height}"}


def video_link(stats: Iterable[stats_pb2.RtcStats]) -> VideoLink | None:
    """Summarise the outbound video streams in a publisher's stats; None when there are
    none yet (not published) or none is usable.

    ``active`` is not consulted: it is the application's per-layer switch (dynacast),
    not a bandwidth signal, and a build that omits it would read as ``false``. Entries
    whose numbers are not finite or are negative are skipped, not trusted: the stats
    come from native code across an FFI boundary and feed a controller."""
    target = 0.0
    sending = 0
    reasons: set[int] = set()
    top: stats_pb2.OutboundRtpStreamStats | None = None
    for s in stats:
        if s.WhichOneof("stats") != "outbound_rtp":
            continue
        rtp = s.outbound_rtp
        if rtp.stream.kind != "video":
            continue
        out = rtp.outbound
        if not (math.isfinite(out.target_bitrate) and out.target_bitrate >= 0
                and math.isfinite(out.frames_per_second) and out.frames_per_second >= 0):
            continue
        target = max(target, out.target_bitrate)
        reasons.add(out.quality_limitation_reason)
        if out.frames_per_second > 0:
            sending += 1
        if top is None or _rank(out) > _rank(top):
            top = out
    if top is None:
        return None
    limitation = next((name for code, name in _REASONS.items() if code in reasons), None)
    return VideoLink(target_bitrate=int(target), limitation=limitation, layers=sending,
                     fps=float(top.frames_per_second), width=int(top.frame_width),
                     height=int(top.frame_height))


def _rank(out: stats_pb2.OutboundRtpStreamStats) -> tuple[bool, int]:
    """The layer a viewer with a good link gets: sending first, then the largest."""
    return out.frames_per_second > 0, out.frame_width * out.frame_height
