"""A few encoder threads shared by every sink of a node, each sink's work in order.

One thread per sink was simple, but with a dozen encoding streams on two cores the
threads fight the event loop for the GIL: every encoder thread that comes back from
C code (where libx264 runs without the GIL) waits its turn, and so does the loop,
whose clock then sends frames late although the cores are not full. A pool of about
one thread per core does the same encoding with a fraction of the contention.

Order: each sink owns a :class:`Lane`. A lane is in the pool's ready queue at most
once (its ``scheduled`` flag, under the lane's lock), so only one worker runs a lane
at a time and its items are handled in the order they were put. A worker handles a
few items of a lane and then puts it back at the end of the ready queue, so one busy
stream cannot starve the others.

Closing: ``close`` stops the workers and then handles, in its own thread, whatever
lanes were still queued (a lane requeued behind the stop markers would otherwise be
stranded, and its sink's ``join`` would wait forever). After that a ``put`` is refused.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from rapido.pipeline.sinks.base import SinkError, lower_thread_priority

log = logging.getLogger(__name__)

#: Items of one lane a worker handles before giving the others a turn.
BURST: Final = 4


class Lane:
    """One sink's ordered, bounded work queue on an :class:`EncoderPool`."""

    def __init__(self, pool: EncoderPool, handler: Callable[[Any], None], max_queue: int,
                 name: str) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.pool = pool
        self.name = name
        self.max_queue = max_queue
        self._handler = handler
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._idle = threading.Event()
        self._idle.set()

    def put(self, item: Any) -> bool:
        """Queue ``item``; False (and nothing queued) when the lane is full or its
        pool has closed."""
        with self._lock:
            if len(self._items) >= self.max_queue:
                return False
            self._items.append(item)
            if not self._scheduled:
                if not self.pool._schedule(self):
                    self._items.pop()
                    return False
                self._scheduled = True
                self._idle.clear()
        return True

    def clear(self) -> list[Any]:
        """Drop what is queued and not yet handled (barge-in); returns it."""
        with self._lock:
            dropped = list(self._items)
            self._items.clear()
            return dropped

    def qsize(self) -> int:
        return len(self._items)

    def join(self, timeout: float | None = None) -> bool:
        """Block until everything put so far is handled (call it off the loop)."""
        return self._idle.wait(timeout)

    def _run(self, burst: int = BURST) -> None:
        """In a worker: handle up to ``burst`` items, then yield the worker."""
        for _ in range(burst):
            with self._lock:
                if not self._items:
                    self._scheduled = False
                    self._idle.set()
                    return
                item = self._items.popleft()
            try:
                self._handler(item)
            except Exception:  # a handler's own errors are its business; never the pool's
                log.exception("encoder pool: %s failed on an item", self.name)
        with self._lock:
            if not self._items:
                self._scheduled = False
                self._idle.set()
                return
        if not self.pool._schedule(self):  # still scheduled: back of the line
            self._run(burst=1 << 62)  # the pool has finished: nobody else will


class EncoderPool:
    """``threads`` workers, started on first use, at a lower priority than the loop."""

    def __init__(self, threads: int, name: str = "rapido-encode") -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self.name = name
        self._ready: queue.SimpleQueue[Lane | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._finished = False  # workers gone: nothing may be queued any more

    def lane(self, handler: Callable[[Any], None], *, max_queue: int, name: str) -> Lane:
        with self._lock:
            if self._closed:
                raise SinkError("the node's encoder pool is closed (the node is stopping)")
            if not self._workers:
                for i in range(self.threads):
                    t = threading.Thread(target=self._work, name=f"{self.name}-{i}",
                                         daemon=True)
                    t.start()
                    self._workers.append(t)
        return Lane(self, handler, max_queue, name)

    def _schedule(self, lane: Lane) -> bool:
        with self._lock:
            if self._finished:
                return False
            self._ready.put(lane)
            return True

    def _work(self) -> None:
        lower_thread_priority()
        while True:
            lane = self._ready.get()
            if lane is None:
                return
            lane._run()

    def close(self) -> None:
        """Stop the workers, then finish every lane still queued (blocking)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._workers)
            for _ in workers:
                self._ready.put(None)
        for t in workers:
            t.join()
        with self._lock:
            self._finished = True
        # Lanes that requeued themselves behind the stop markers, or were scheduled
        # after them: run them to the end here.
        while True:
            try:
                lane = self._ready.get_nowait()
            except queue.Empty:
                break
            if lane is not None:
                lane._run(burst=1 << 62)
