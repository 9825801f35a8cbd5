"""The sink seam: where a stream's frames leave the process."""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol, runtime_checkable

from rapido.pipeline.media import MediaChunk


def stop_worker(work: queue.Queue[Any], thread: threading.Thread, sentinel: object) -> None:
    """Hand a sink's worker thread its stop sentinel and wait for it (blocking: call it
    off the loop). The worker drains the queue until it sees the sentinel, so put() only
    waits for one free slot; the liveness check guards against a worker that died."""
    while True:
        try:
            work.put(sentinel, timeout=0.1)
            break
        except queue.Full:
            if not thread.is_alive():
                break
    thread.join()


class SinkError(RuntimeError):
    """A sink could not be opened (bad path, encoder unavailable, ...)."""


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

    def interrupt(self) -> None:
        """Drop whatever is queued but not yet played out (barge-in)."""
        ...

    @property
    def playout_frames(self) -> int:
        """Frames that have left this sink (played out, encoded, or counted)."""
        ...

    def stats(self) -> dict[str, Any]: ...

    async def aclose(self) -> None:
        """Flush and finalise; idempotent."""
        ...
