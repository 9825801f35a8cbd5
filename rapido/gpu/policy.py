"""BatchPolicy: when a micro-batch leaves and what is in it. Pure and synchronous: time
comes in as an argument; :class:`rapido.gpu.batcher.MicroBatcher` is its asyncio shell.

The policy (after Triton's dynamic batcher, plus deadlines):

* A batch is released as soon as any of these holds:

  - the queue holds ``max_batch`` requests (a full batch gains nothing by waiting);
  - the oldest request has waited ``max_wait_s``;
  - the earliest deadline is due: ``now >= deadline - (run_estimate_s + deadline_slack_s)``.
    Waiting past that point would leave the model too little time to answer in time.
    ``run_estimate_s`` follows the measured batch run time (:meth:`BatchPolicy.observe_run`);
    the slack absorbs timer wake-up jitter. A deadline that has already passed is due too,
    so its miss is reported at once.

* A batch holds at most ``max_batch`` requests, the most urgent first: earliest deadline,
  then higher priority, then arrival order. A request whose deadline has passed
  (``deadline <= now``) is never run: :meth:`BatchPolicy.take` hands it back in ``expired``
  to be answered as a miss. A request whose deadline falls *while* the model runs still
  gets its result; what a late frame is worth is the caller's call.

* With ``preferred_batch_sizes``, a release of fewer than ``max_batch`` requests is cut to
  the largest preferred size that fits (all of them if none fits); the rest stay queued
  and, being old, leave with the next batch. The timing rules above are unchanged.
  :meth:`BatchPolicy.pad_to` tells the backend which size to pad a batch to.

* After :meth:`BatchPolicy.flush` (the producer has submitted all it has until its next
  tick) a release is never cut: it takes up to ``max_batch`` at once. Nothing can join
  the remainder before the next tick, so a cut only splits one model call into several
  run back to back (28 queued with sizes 1, 2, 4, 8, 32 went out as 8 + 8 + 8 + 4: four
  device round trips where one, padded to 32, does the same work). Triton cuts to a
  preferred size because more requests may still come; after a flush none can.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from heapq import heappop, heappush
from typing import Generic, TypeVar

__all__ = ["BatchPolicy", "check_sizes"]

T = TypeVar("T")


def check_sizes(max_batch: int, preferred: Sequence[int]) -> tuple[int, ...]:
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = tuple(preferred)
    if any(s < 1 for s in sizes):
        raise ValueError(f"preferred_batch_sizes must be positive, got {sizes}")
    if any(a >= b for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"preferred_batch_sizes must be sorted and distinct, got {sizes}")
    if sizes and sizes[-1] > max_batch:
        raise ValueError(f"preferred_batch_sizes must be <= max_batch ({max_batch}), got {sizes}")
    return sizes


class BatchPolicy(Generic[T]):
    """When to release a batch and what goes in it. Pure: time is always an argument,
    and nothing here reads a clock, sleeps or touches asyncio."""

    def __init__(self, max_batch: int = 8, max_wait_s: float = 0.03,
                 preferred_batch_sizes: Sequence[int] = (), *, run_estimate_s: float = 0.0,
                 deadline_slack_s: float = 0.002, run_smoothing: float = 0.2) -> None:
        self.preferred_batch_sizes = check_sizes(max_batch, preferred_batch_sizes)
        if not max_wait_s >= 0:  # written so that NaN fails too
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if not (run_estimate_s >= 0 and deadline_slack_s >= 0):
            raise ValueError("run_estimate_s and deadline_slack_s must be >= 0")
        if not 0 < run_smoothing <= 1:
            raise ValueError(f"run_smoothing must be in (0, 1], got {run_smoothing}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.run_estimate_s = run_estimate_s
        self.deadline_slack_s = deadline_slack_s
        self.run_smoothing = run_smoothing
        self._runs_seen = 0
        # EDF heap; seq is unique, so tuples never compare the items themselves.
        self._queue: list[tuple[float, int, int, float, T]] = []
        # Arrival heap with lazy deletion: taking from the EDF heap only forgets the seq in
        # _live, and stale arrivals are popped when they reach the top.
        self._arrivals: list[tuple[float, int]] = []
        # Set by flush(): the producer says nothing more is coming for now, so what is
        # queued leaves without waiting for the batch to fill.
        self._flushing = False
        self._live: set[int] = set()
        self._seq = 0

    def add(self, item: T, *, now: float, deadline: float, priority: int = 0) -> None:
        if math.isnan(deadline) or math.isnan(now):
            raise ValueError("now and deadline must not be NaN")
        seq = self._seq
        self._seq += 1
        heappush(self._queue, (deadline, -priority, seq, now, item))
        heappush(self._arrivals, (now, seq))
        self._live.add(seq)

    def __len__(self) -> int:
        return len(self._queue)

    def oldest_arrival(self) -> float | None:
        arrivals, live = self._arrivals, self._live
        while arrivals and arrivals[0][1] not in live:
            heappop(arrivals)
        return arrivals[0][0] if arrivals else None

    def oldest_wait(self, now: float) -> float:
        oldest = self.oldest_arrival()
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def earliest_deadline(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def _due_at(self) -> float:
        """When the wait or deadline rule fires; queue must not be empty."""
        oldest = self.oldest_arrival()
        assert oldest is not None
        by_deadline = self._queue[0][0] - (self.run_estimate_s + self.deadline_slack_s)
        return min(oldest + self.max_wait_s, by_deadline)

    def flush(self) -> None:
        """The producer has submitted all it has for now (e.g. every stream of a clock
        tick): release what is queued at once, in batches of up to max_batch, instead of
        waiting max_wait for requests that cannot come."""
        if self._queue:
            self._flushing = True

    def ready(self, now: float) -> bool:
        """True when a batch should leave now (see the module docstring for the rules)."""
        n = len(self._queue)
        if n == 0:
            return False
        return self._flushing or n >= self.max_batch or now >= self._due_at()

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`ready` turns true if nothing else arrives: ``now`` if it already is,
        None for an empty queue."""
        if not self._queue:
            return None
        if self._flushing or len(self._queue) >= self.max_batch:
            return now
        return max(now, self._due_at())

    def batch_size_for(self, n: int) -> int:
        """How many of ``n`` runnable queued requests a release takes."""
        if n >= self.max_batch:
            return self.max_batch
        sizes = self.preferred_batch_sizes
        if sizes:
            i = bisect.bisect_right(sizes, n)
            if i:
                return sizes[i - 1]
        return n

    def pad_to(self, n: int) -> int:
        """The size to pad a batch of ``n`` to: the smallest preferred size >= n, else n."""
        if n < 1:
            raise ValueError(f"a batch has at least one request, got {n}")
        sizes = self.preferred_batch_sizes
        i = bisect.bisect_left(sizes, n)
        return sizes[i] if i < len(sizes) else n

    def take(self, now: float) -> tuple[list[T], list[T]]:
        """Release ``(batch, expired)``: what a release at ``now`` hands out, whether or not
        :meth:`ready` said so (so it also serves to flush). ``expired`` is every request
        whose deadline has passed, however many; ``batch`` may be empty."""
        queue, live = self._queue, self._live
        expired: list[T] = []
        while queue and queue[0][0] <= now:
            entry = heappop(queue)
            live.discard(entry[2])
            expired.append(entry[4])
        batch: list[T] = []
        n = len(queue)
        for _ in range(min(n, self.max_batch) if self._flushing else self.batch_size_for(n)):
            entry = heappop(queue)
            live.discard(entry[2])
            batch.append(entry[4])
        if not queue:
            self._arrivals.clear()  # drop the stale entries in one go
            self._flushing = False
        return batch, expired

    def drain(self) -> list[T]:
        """Remove and return everything queued, most urgent first."""
        items = [entry[4] for entry in sorted(self._queue)]
        self._queue.clear()
        self._arrivals.clear()
        self._live.clear()
        self._flushing = False
        return items

    def observe_run(self, seconds: float) -> None:
        """Feed a measured batch run time into ``run_estimate_s`` (moving average; the first
        measurement replaces the initial guess)."""
        if not seconds >= 0:
            return
        if self._runs_seen == 0:
            self.run_estimate_s = seconds
        else:
            a = self.run_smoothing
            self.run_estimate_s += a * (seconds - self.run_estimate_s)
        self._runs_seen += 1
