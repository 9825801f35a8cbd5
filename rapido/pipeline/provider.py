"""The sink registry's seam: a provider makes one kind of sink for new sessions.

The engine keeps providers by sink name (``null``, ``record``, ``webrtc``, ``livekit``)
and knows nothing of what is behind them. A provider may keep something per session
(the LiveKit region a session publishes to, an agent bridge) and add to the session's
JSON; most need none of that and are a :class:`SinkFactory` around a constructor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from rapido.pipeline.session import SessionSpec, StreamSession
from rapido.pipeline.sinks.base import Sink


class SinkProvider(Protocol):
    def open(self, spec: SessionSpec, session_id: str, node_id: str) -> Sink:
        """A new, not yet started sink for a session being created. Raises
        :class:`~rapido.pipeline.errors.SinkUnavailable` or
        :class:`~rapido.pipeline.errors.AdmissionError` to refuse the session."""
        ...

    def bind(self, session: StreamSession) -> None:
        """The session made with the last ``open`` exists and its sink started."""
        ...

    async def release(self, session: StreamSession) -> None:
        """The session is closing (its sink closes next): stop what serves it."""
        ...

    def closed(self, session: StreamSession) -> None:
        """The session and its sink have closed: forget what was kept for it."""
        ...

    def describe(self, session: StreamSession) -> dict[str, Any]:
        """What this kind of sink adds to the session's JSON (may be empty)."""
        ...

    async def aclose(self) -> None:
        """The node is stopping and every session is closed."""
        ...


class SinkFactory:
    """A provider for sinks that need nothing per session but their own object."""

    def __init__(self, make: Callable[[SessionSpec, str], Sink], *,
                 close: Callable[[], Awaitable[None]] | None = None) -> None:
        self._make = make
        self._close = close

    def open(self, spec: SessionSpec, session_id: str, node_id: str) -> Sink:
        return self._make(spec, session_id)

    def bind(self, session: StreamSession) -> None:
        pass

    async def release(self, session: StreamSession) -> None:
        pass

    def closed(self, session: StreamSession) -> None:
        pass

    def describe(self, session: StreamSession) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        if self._close is not None:
            await self._close()
