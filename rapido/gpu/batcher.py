"""Micro-batching: every stream's lip-sync requests, one shared model, one batch at a time.

Two layers, like the jitter buffer. :class:`BatchPolicy` is pure and synchronous (time
comes in as an argument) and decides *when* a batch leaves and *what* is in it.
:class:`MicroBatcher` is the asyncio shell: it feeds the policy, runs the model in one
worker thread and answers every request exactly once.

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
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from heapq import heappop, heappush
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from rapido.aio import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")
Req = TypeVar("Req")
Res = TypeVar("Res")

_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5, 1.0)
_RUN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2,
                0.5, 1.0)


# -- errors ----------------------------------------------------------------------------


class BatcherError(RuntimeError):
    """Base of what a request can be answered with instead of a result."""


class DeadlineMiss(BatcherError):
    """The request's deadline passed while it was queued; the model never saw it."""

    def __init__(self, deadline: float, now: float) -> None:
        super().__init__(f"deadline passed {1000.0 * (now - deadline):.1f} ms before the "
                         "request could be batched")
        self.deadline = deadline
        self.now = now


class BatchError(BatcherError):
    """The batch holding this request failed; ``cause`` (also ``__cause__``) says why."""

    def __init__(self, message: str, cause: BaseException | None = None,
                 batch_size: int = 0) -> None:
        super().__init__(message)
        self.cause = cause
        self.batch_size = batch_size
        self.__cause__ = cause


class BatcherClosed(BatcherError):
    """The batcher was closed before this request ran."""


# -- the policy ------------------------------------------------------------------------


def _check_sizes(max_batch: int, preferred: Sequence[int]) -> tuple[int, ...]:
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
        self.preferred_batch_sizes = _check_sizes(max_batch, preferred_batch_sizes)
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
        for _ in range(self.batch_size_for(len(queue))):
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


# -- metrics ---------------------------------------------------------------------------


class BatcherMetrics:
    """The batchers' Prometheus series on one registry, labelled by model name. Make one
    per registry and share it between batchers: a second one would clash on the names."""

    def __init__(self, registry: CollectorRegistry, *, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        r = registry
        self.batch_size = Histogram(
            "batch_size", "Requests per model batch", ["model"],
            buckets=tuple(float(i) for i in range(1, max_batch + 1)), registry=r)
        self.queue_wait = Histogram(
            "batch_queue_wait_seconds", "Time a request queued before its batch started",
            ["model"], buckets=_WAIT_BUCKETS, registry=r)
        self.run = Histogram(
            "batch_run_seconds", "Model time of one batch, in the worker thread", ["model"],
            buckets=_RUN_BUCKETS, registry=r)
        self.deadline_misses = Counter(
            "batch_deadline_misses", "Requests whose deadline passed while queued", ["model"],
            registry=r)  # exported as batch_deadline_misses_total
        self.failures = Counter(
            "batch_failures", "Batches that raised or returned the wrong number of results",
            ["model"], registry=r)


# -- the asyncio shell -----------------------------------------------------------------


class _Pending(Generic[Req, Res]):
    __slots__ = ("arrival", "callback", "deadline", "request")

    def __init__(self, request: Req, callback: Callable[[Req, Res | BaseException], None],
                 deadline: float, arrival: float) -> None:
        self.request = request
        self.callback = callback
        self.deadline = deadline
        self.arrival = arrival


def _call_model(run_batch: Callable[[list[Req]], Sequence[Res]],
                requests: list[Req]) -> tuple[list[Res], float]:
    # Runs in the worker thread: list() makes len() safe for any iterable, off the loop.
    t0 = time.perf_counter()
    results = list(run_batch(requests))
    return results, time.perf_counter() - t0


class MicroBatcher(Generic[Req, Res]):
    """Gathers requests from many streams into batches for one synchronous model.

    ``run_batch`` runs in one dedicated worker thread, one batch at a time; requests that
    arrive meanwhile form the next batch. Every request gets exactly one callback, on the
    event loop, never from inside :meth:`submit_nowait`. Deadlines are ``loop.time()``
    values. Bound to the event loop of its first submit.
    """

    def __init__(self, run_batch: Callable[[list[Req]], Sequence[Res]], *,
                 max_batch: int = 8, max_wait_ms: float = 30.0,
                 preferred_batch_sizes: tuple[int, ...] = (), name: str = "model",
                 metrics: BatcherMetrics | None = None,
                 executor: Executor | None = None, max_in_flight: int = 1) -> None:
        _check_sizes(max_batch, preferred_batch_sizes)
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.name = name
        self.policy: BatchPolicy[_Pending[Req, Res]] = BatchPolicy(
            max_batch, max_wait_ms / 1000.0, preferred_batch_sizes)
        self._run_batch = run_batch
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=max_in_flight, thread_name_prefix=f"batcher-{name}")
        self._metrics = metrics
        if metrics is not None:
            self._m_size = metrics.batch_size.labels(name)
            self._m_wait = metrics.queue_wait.labels(name)
            self._m_run = metrics.run.labels(name)
            self._m_miss = metrics.deadline_misses.labels(name)
            self._m_fail = metrics.failures.labels(name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One future per batch in the model, done once that batch is answered.
        self._running: set[asyncio.Future[None]] = set()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        # stats
        self._submitted = 0
        self._batches = 0
        self._batched = 0
        self._misses = 0
        self._failures = 0
        self._failed_requests = 0
        self._closed_requests = 0
        self._last_batch_s = 0.0

    # -- submitting ---------------------------------------------------------------------

    def submit_nowait(self, request: Req, *, deadline: float,
                      callback: Callable[[Req, Res | BaseException], None],
                      priority: int = 0) -> None:
        """Queue ``request``; ``callback(request, result_or_exception)`` follows later, on
        the loop: a result, :class:`DeadlineMiss`, :class:`BatchError` or
        :class:`BatcherClosed`. Must be called on the event loop."""
        loop = asyncio.get_running_loop()
        self._submitted += 1
        if self._closed:
            self._closed_requests += 1
            late: _Pending[Req, Res] = _Pending(request, callback, deadline, loop.time())
            loop.call_soon(self._answer, late, BatcherClosed(f"batcher {self.name!r} is closed"))
            return
        if self._loop is not loop:
            self._start(loop)
        now = loop.time()
        self.policy.add(_Pending(request, callback, deadline, now), now=now,
                        deadline=deadline, priority=priority)
        self._wake.set()

    async def submit(self, request: Req, *, deadline: float, priority: int = 0) -> Res:
        """Like :meth:`submit_nowait`, awaiting the result; raises what it would pass."""
        fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()

        def done(_req: Req, result: Res | BaseException) -> None:
            if fut.done():  # the awaiting caller was cancelled
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.submit_nowait(request, deadline=deadline, callback=done, priority=priority)
        return await fut

    def flush(self) -> None:
        """Release what is queued now (see :meth:`BatchPolicy.flush`)."""
        self.policy.flush()
        self._wake.set()

    def pad_to(self, n: int) -> int:
        return self.policy.pad_to(n)

    # -- the serving task ---------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError(f"batcher {self.name!r} is bound to another event loop")
        self._loop = loop
        self._task = loop.create_task(self._serve(), name=f"batcher-{self.name}")
        self._task.add_done_callback(self._serve_done)

    async def _serve(self) -> None:
        loop = self._loop
        assert loop is not None
        policy, wake = self.policy, self._wake
        while True:
            now = loop.time()
            if not policy.ready(now):
                wake.clear()
                wake_at = policy.next_wakeup(now)
                if wake_at is None or not math.isfinite(wake_at):
                    await wake.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(wake_at):
                            await wake.wait()
                continue
            await self._slots.acquire()
            now = loop.time()  # the wait for a slot may have taken a while
            batch, expired = policy.take(now)
            for p in expired:
                self._misses += 1
                if self._metrics is not None:
                    self._m_miss.inc()
                self._answer(p, DeadlineMiss(p.deadline, now))
            if batch:
                self._run(loop, batch, now)  # releases the slot when answered
            else:
                self._slots.release()

    def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[Req, Res]],
             now: float) -> None:
        self._batches += 1
        self._batched += len(batch)
        if self._metrics is not None:
            self._m_size.observe(len(batch))
            for p in batch:
                self._m_wait.observe(max(0.0, now - p.arrival))
        done: asyncio.Future[None] = loop.create_future()
        try:
            fut = loop.run_in_executor(self._executor, _call_model, self._run_batch,
                                       [p.request for p in batch])
        except RuntimeError as exc:  # e.g. a given executor that was shut down
            self._fail(batch, f"could not start batch: {exc}", exc)
            self._slots.release()
            return
        self._running.add(done)
        self._in_flight += len(batch)
        # Answering from a done-callback, so that cancelling the serving task (aclose)
        # can never lose the answers of a batch already in the model.
        fut.add_done_callback(lambda f: self._finish(batch, f, done))

    def _finish(self, batch: list[_Pending[Req, Res]],
                fut: asyncio.Future[tuple[list[Res], float]], done: asyncio.Future[None]
                ) -> None:
        try:
            self._running.discard(done)
            self._in_flight -= len(batch)
            if fut.cancelled():
                self._fail(batch, "batch was cancelled in the executor", None)
                return
            exc = fut.exception()
            if exc is not None:
                self._fail(batch, f"run_batch raised {type(exc).__name__}: {exc}", exc)
                return
            results, run_s = fut.result()
            self._last_batch_s = run_s
            self.policy.observe_run(run_s)
            if self._metrics is not None:
                self._m_run.observe(run_s)
            if len(results) != len(batch):
                self._fail(batch, f"run_batch returned {len(results)} results for "
                                  f"{len(batch)} requests", None)
                return
            for p, result in zip(batch, results, strict=True):
                self._answer(p, result)
        finally:
            done.set_result(None)
            self._slots.release()

    def _fail(self, batch: list[_Pending[Req, Res]], message: str,
              cause: BaseException | None) -> None:
        self._failures += 1
        self._failed_requests += len(batch)
        if self._metrics is not None:
            self._m_fail.inc()
        log.error("batcher %s: batch of %d failed: %s", self.name, len(batch), message,
                  exc_info=cause)
        for p in batch:
            # One exception per request: a shared one would collect every awaiter's traceback.
            self._answer(p, BatchError(message, cause, len(batch)))

    def _answer(self, p: _Pending[Req, Res], value: Res | BaseException) -> None:
        try:
            p.callback(p.request, value)
        except Exception:
            # One caller's broken callback must not cost the rest of the batch its answers.
            log.exception("batcher %s: a request's callback raised", self.name)

    def _serve_done(self, task: asyncio.Task[None]) -> None:
        if self._closed:
            return
        # Cancelled from outside (loop shutdown) or crashed: nobody would serve the queue
        # again, so close, which answers it, rather than leave callers waiting forever.
        if not task.cancelled() and task.exception() is not None:
            log.critical("batcher %s: serving task died", self.name, exc_info=task.exception())
        self._closed = True
        self._close_queue()

    def _close_queue(self) -> None:
        for p in self.policy.drain():
            self._closed_requests += 1
            self._answer(p, BatcherClosed(f"batcher {self.name!r} closed before the "
                                          "request ran"))

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Answer everything queued with :class:`BatcherClosed`, let a running batch finish
        and deliver, stop the task and the own executor. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self._close(), name=f"batcher-{self.name}-close")
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._closed = True
        self._close_queue()
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._running:
            await asyncio.wait(set(self._running))
        if self._own_executor:
            # The batch is answered, so the worker is idle and joins at once.
            self._executor.shutdown(wait=True)

    async def __aenter__(self) -> MicroBatcher[Req, Res]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- reporting ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self.policy)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "batches": self._batches,
            "requests": self._submitted,
            "batched_requests": self._batched,
            "misses": self._misses,
            "failures": self._failures,
            "failed_requests": self._failed_requests,
            "closed_requests": self._closed_requests,
            "mean_batch_size": self._batched / self._batches if self._batches else 0.0,
            "queue_depth": len(self.policy),
            "in_flight": self._in_flight,
            "last_batch_ms": 1000.0 * self._last_batch_s,
            "run_estimate_ms": 1000.0 * self.policy.run_estimate_s,
        }
