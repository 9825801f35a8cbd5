"""Micro-batching: every stream's lip-sync requests, one shared model, one batch at a time.

Two layers, like the jitter buffer. :class:`rapido.gpu.policy.BatchPolicy` is pure and
synchronous (time comes in as an argument) and decides *when* a batch leaves and *what* is
in it (its module docstring has the rules). :class:`MicroBatcher` is the asyncio shell: it
feeds the policy, runs the model in one worker thread and answers every request exactly
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from rapido.aio import cancel_and_wait
from rapido.gpu.policy import BatchPolicy, check_sizes

log = logging.getLogger(__name__)

_M_co = TypeVar("_M_co", covariant=True)
Req = TypeVar("Req")
Res = TypeVar("Res")


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


#: What runtimes say when a device allocation fails: torch's OutOfMemoryError (CUDA, ROCm,
#: MPS), ONNX Runtime's "Failed to allocate memory" / BFCArena and CUDA's own codes.
_MEMORY_ERRORS = ("out of memory", "failed to allocate memory", "cuda_error_out_of_memory",
                  "cudaerrormemoryallocation", "bfcarena")


def is_memory_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the device running out of memory."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "OutOfMemoryError":
            return True
        text = str(e).lower()
        if any(m in text for m in _MEMORY_ERRORS):
            return True
        e = e.__cause__ or e.__context__
    return False


class BatcherClosed(BatcherError):
    """The batcher was closed before this request ran."""


# -- metrics ---------------------------------------------------------------------------


class _Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class _Labelled(Protocol[_M_co]):
    def labels(self, *labelvalues: str) -> _M_co: ...


class BatcherSeries(Protocol):
    """The Prometheus series a batcher records into, labelled by the batcher's name
    (:class:`rapido.metrics.BatcherMetrics` is the node's)."""

    @property
    def batch_size(self) -> _Labelled[_Histogram]: ...
    @property
    def queue_wait(self) -> _Labelled[_Histogram]: ...
    @property
    def run(self) -> _Labelled[_Histogram]: ...
    @property
    def deadline_misses(self) -> _Labelled[_Counter]: ...
    @property
    def failures(self) -> _Labelled[_Counter]: ...
    @property
    def memory_errors(self) -> _Labelled[_Counter]: ...


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
                 metrics: BatcherSeries | None = None,
                 executor: Executor | None = None, max_in_flight: int = 1) -> None:
        check_sizes(max_batch, preferred_batch_sizes)
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
            self._m_memory = metrics.memory_errors.labels(name)
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
            if cause is not None and is_memory_error(cause):
                self._m_memory.inc()
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
