"""When audio handed to a native ``rtc.AudioSource`` is sent: the instant its picture
must be captured for the two to stay in sync.

The native source (``webrtc-sys`` ``AudioTrackSource``) keeps a buffer that a 10 ms timer
drains into libwebrtc, 10 ms at a time, and sends nothing while it holds less than that.
Audio therefore starts to play when what was queued before it has played, or at once
(within a tick) if the buffer had run dry: the sender's clock, which its RTCP reports
tie to the RTP time, is not advanced for the gap, so the next sound goes out at once.

``AudioSource.queued_duration`` models the same buffer but lets its level go negative
after a gap (``q += frame - elapsed``, never floored), so after each stall longer than
what was queued it reports less than the buffer holds, for good. This model floors it.

Pure and synchronous, on the caller's clock (seconds, monotonic).
"""

from __future__ import annotations

from collections import deque

__all__ = ["SEND_DELAY_S", "AudioPlayout"]

#: How much later than :meth:`AudioPlayout.capture` says a sound is placed on the
#: sender's clock, as a receiver decodes it: the native timer's phase (0-10 ms, not
#: observable from here: its middle), libwebrtc's audio sender reports, which stamp an
#: Opus packet with the time it is sent, when the second 10 ms of its 20 ms have arrived,
#: and Opus's own algorithmic delay (6.5 ms). Measured with pulses in both streams through
#: the stand-in SFU: pictures led their sound by 16-27 ms, 22 ms on average
#: (``tests/test_livekit_e2e.py::test_pulses_in_picture_and_sound_arrive_together``).
SEND_DELAY_S = 0.022


class AudioPlayout:
    """The instant the native buffer runs dry, advanced by each capture; and where the
    speech in it lies, so a clear can tell how much of it was never heard."""

    def __init__(self) -> None:
        self._end = 0.0
        self._speech: deque[tuple[float, float]] = deque()  # (start, end) still queued

    def capture(self, now: float, duration_s: float, speaking: bool = False) -> float:
        """Audio of ``duration_s`` entered the buffer at ``now``: when it starts to play."""
        if duration_s <= 0:
            raise ValueError(f"duration must be positive, got {duration_s}")
        start = max(self._end, now)
        self._end = start + duration_s
        while self._speech and self._speech[0][1] <= now:
            self._speech.popleft()
        if speaking:
            self._speech.append((start, self._end))
        return start

    def queued(self, now: float) -> float:
        """Seconds of audio in the buffer at ``now``."""
        return max(0.0, self._end - now)

    def clear(self, now: float) -> float:
        """The buffer was emptied (``clear_queue``) at ``now``: nothing is left to play.
        Returns the seconds of speech it held that had not been played."""
        unheard = sum(end - max(start, now) for start, end in self._speech if end > now)
        self._speech.clear()
        self._end = min(self._end, now)
        return unheard
