"""What a :class:`~rapido.pipeline.session.StreamSession` tells its listeners.

A listener (``session.subscribe()``) gets these typed events, then ``None`` once the
session is closed or the listener was cut off for not reading. The playback events are
the jitter buffer's own dataclasses, re-exported here so listeners import from one place;
a session publishes them with times rounded to 0.1 ms (what its clients are told). How
they are written on a wire is the wire's business (``rapido.http.ws.event_json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rapido.pipeline.jitter import PlaybackFinished, PlaybackStarted, Refill, Underrun

__all__ = [
    "Closed",
    "Listener",
    "PlaybackFinished",
    "PlaybackStarted",
    "Refill",
    "SessionEvent",
    "Underrun",
]


@dataclass(frozen=True, slots=True)
class Closed:
    """The session is closed (its last event; ``None`` follows)."""

    reason: str  # "closed", "deleted", "idle_timeout", "shutdown", "error", ...


SessionEvent = PlaybackStarted | PlaybackFinished | Underrun | Refill | Closed


class Listener(Protocol):
    """Where a session puts its events: an ``asyncio.Queue`` of them, or of a wider type
    (a WebSocket's outbox also carries that socket's own replies)."""

    def put_nowait(self, item: SessionEvent | None, /) -> None: ...

    def get_nowait(self) -> object: ...

    def empty(self) -> bool: ...
