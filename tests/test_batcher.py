"""Micro-batcher: the pure policy fed by hand, then the asyncio shell with a real event loop
and a real worker thread. The "model" doubles integers and records the batches it saw.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rapido.gpu.batcher import (
    BatcherClosed,
    BatchError,
    DeadlineMiss,
    MicroBatcher,
    is_memory_error,
)
from rapido.gpu.policy import BatchPolicy
from rapido.metrics import BatcherMetrics

FAR = 1e9  # a deadline nobody reaches
WAIT = 3.0  # seconds: no answer by then means none is coming


class Model:
    """Doubles every request; records each batch and the thread it ran in."""

    def __init__(self, *, sleep_s: float = 0.0, fail: Callable[[int], bool] | None = None,
                 short: Callable[[int], bool] | None = None,
                 gate: threading.Event | None = None) -> None:
        self.sleep_s = sleep_s
        self.fail = fail
        self.short = short
        self.gate = gate
        self.started = threading.Event()
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, requests: list[int]) -> list[int]:
        with self._lock:
            self.batches.append(list(requests))
            self.threads.add(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(5.0), "test never opened the gate"
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fail is not None and any(self.fail(r) for r in requests):
            raise ValueError(f"poisoned batch {requests}")
        out = [2 * r for r in requests]
        if self.short is not None and any(self.short(r) for r in requests):
            out.pop()
        return out


def submit_all(b: MicroBatcher[int, int], requests: list[int], deadlines: list[float],
               priorities: list[int] | None = None) -> list[asyncio.Future[int]]:
    """submit_nowait each request in one synchronous pass (the batcher can't run in between),
    each answer landing in its own future."""
    loop = asyncio.get_running_loop()
    futs: list[asyncio.Future[int]] = []
    for i, (r, d) in enumerate(zip(requests, deadlines, strict=True)):
        fut: asyncio.Future[int] = loop.create_future()

        def cb(_req: int, res: int | BaseException, fut: asyncio.Future[int] = fut) -> None:
            assert not fut.done(), "second callback for one request"
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)

        b.submit_nowait(r, deadline=d, callback=cb,
                        priority=priorities[i] if priorities else 0)
        futs.append(fut)
    return futs


# -- the policy ------------------------------------------------------------------------


def test_policy_releases_at_max_batch() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_batch=4, max_wait_s=1.0)
    for i, item in enumerate("abc"):
        p.add(item, now=0.1 * i, deadline=FAR)
    assert not p.ready(0.3)
    p.add("d", now=0.3, deadline=FAR)
    assert p.ready(0.3) and p.next_wakeup(0.3) == 0.3
    p.add("e", now=0.3, deadline=FAR)
    batch, expired = p.take(0.3)
    assert batch == ["a", "b", "c", "d"] and expired == [] and len(p) == 1


def test_policy_releases_when_oldest_waited_max_wait() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_batch=8, max_wait_s=0.03)
    assert not p.ready(0.0) and p.next_wakeup(0.0) is None and p.oldest_wait(5.0) == 0.0
    p.add("a", now=1.0, deadline=FAR)
    p.add("b", now=1.02, deadline=FAR)
    assert p.oldest_wait(1.02) == pytest.approx(0.02)
    assert not p.ready(1.029)
    assert p.next_wakeup(1.02) == pytest.approx(1.03)
    assert p.ready(1.03)
    assert p.take(1.03) == (["a", "b"], [])
    assert len(p) == 0 and not p.ready(2.0)


def test_policy_max_wait_zero_releases_at_once() -> None:
    p: BatchPolicy[int] = BatchPolicy(max_batch=8, max_wait_s=0.0)
    p.add(1, now=5.0, deadline=FAR)
    assert p.ready(5.0) and p.next_wakeup(5.0) == 5.0


def test_policy_orders_by_deadline_then_priority_then_arrival() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_batch=3, max_wait_s=0.0)
    p.add("late", now=0.0, deadline=9.0)
    p.add("tie-low", now=0.1, deadline=5.0, priority=0)
    p.add("tie-high", now=0.2, deadline=5.0, priority=2)
    p.add("tie-low-2", now=0.3, deadline=5.0, priority=0)
    p.add("urgent", now=0.4, deadline=4.0)
    assert p.take(1.0) == (["urgent", "tie-high", "tie-low"], [])
    assert p.take(1.0) == (["tie-low-2", "late"], [])


def test_policy_returns_every_expired_request() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_batch=2, max_wait_s=1.0)
    for i in range(5):
        p.add(f"old{i}", now=0.0, deadline=1.0 + 0.1 * i)
    p.add("exact", now=0.0, deadline=2.0)  # deadline == now: no time left to run it
    p.add("fresh", now=0.0, deadline=3.0)
    assert p.ready(2.0)  # a passed deadline is reason enough to release
    batch, expired = p.take(2.0)
    # More expired than max_batch: all come back, none is left behind or dropped.
    assert expired == ["old0", "old1", "old2", "old3", "old4", "exact"]
    assert batch == ["fresh"] and len(p) == 0
    p.add("gone", now=3.0, deadline=2.5)
    assert p.take(3.0) == ([], ["gone"])


def test_policy_deadline_rule_releases_before_the_deadline() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_batch=8, max_wait_s=1.0, deadline_slack_s=0.002)
    p.observe_run(0.010)
    assert p.run_estimate_s == 0.010  # the first measurement replaces the guess
    p.add("a", now=0.0, deadline=0.05)
    # Must leave by 0.05 - 10 ms run - 2 ms slack, long before max_wait.
    assert p.next_wakeup(0.0) == pytest.approx(0.038)
    assert not p.ready(0.037)
    assert p.ready(0.0385)
    assert p.take(0.0385) == (["a"], [])


def test_policy_run_estimate_is_a_moving_average() -> None:
    p: BatchPolicy[int] = BatchPolicy(run_estimate_s=0.5, run_smoothing=0.5)
    p.observe_run(0.010)
    p.observe_run(0.030)
    assert p.run_estimate_s == pytest.approx(0.020)


def test_policy_next_wakeup_takes_the_earlier_rule() -> None:
    p: BatchPolicy[str] = BatchPolicy(max_batch=8, max_wait_s=0.03, deadline_slack_s=0.0)
    p.add("a", now=0.0, deadline=0.5)
    assert p.next_wakeup(0.0) == pytest.approx(0.03)
    p.add("b", now=0.01, deadline=0.02)
    assert p.next_wakeup(0.01) == pytest.approx(0.02)
    assert p.next_wakeup(0.025) == 0.025  # already due


def test_policy_preferred_batch_sizes() -> None:
    p: BatchPolicy[int] = BatchPolicy(max_batch=8, max_wait_s=0.01,
                                      preferred_batch_sizes=(2, 4, 8))
    for i in range(7):
        p.add(i, now=0.0, deadline=FAR)
    assert not p.ready(0.005)  # can't fill max_batch and nobody waited long enough
    assert p.ready(0.01)
    assert p.take(0.01) == ([0, 1, 2, 3], [])  # largest preferred size <= 7
    assert p.ready(0.01)  # the rest are just as old
    assert p.take(0.01) == ([4, 5], [])
    assert p.take(0.01) == ([6], [])  # below every preferred size: sent as it is
    for i in range(10):
        p.add(i, now=1.0, deadline=FAR)
    assert p.take(1.0)[0] == list(range(8))  # full batches are never cut
    assert p.pad_to(1) == 2 and p.pad_to(3) == 4 and p.pad_to(4) == 4 and p.pad_to(5) == 8
    q: BatchPolicy[int] = BatchPolicy(max_batch=8, preferred_batch_sizes=(4,))
    assert q.pad_to(3) == 4 and q.pad_to(6) == 6
    assert BatchPolicy[int](max_batch=8).pad_to(5) == 5
    with pytest.raises(ValueError):
        p.pad_to(0)


def test_policy_a_flush_is_never_cut_to_a_preferred_size() -> None:
    """After flush() nothing can join a remainder before the producer's next tick, so a
    cut would only split one model call into several run back to back."""
    p: BatchPolicy[int] = BatchPolicy(max_batch=8, max_wait_s=0.01,
                                      preferred_batch_sizes=(2, 4, 8))
    for i in range(7):
        p.add(i, now=0.0, deadline=FAR)
    p.flush()
    assert p.ready(0.0) and p.next_wakeup(0.0) == 0.0
    assert p.take(0.0) == (list(range(7)), [])  # not 4 + 2 + 1
    assert not p.ready(0.0)
    for i in range(11):
        p.add(i, now=1.0, deadline=FAR)
    p.flush()
    assert p.take(1.0) == (list(range(8)), [])  # max_batch still bounds a batch
    assert p.ready(1.0)  # the flush holds until the queue is empty
    assert p.take(1.0) == ([8, 9, 10], [])  # not cut to 2
    # The flush ended with the queue: a timer release is cut again.
    for i in range(7):
        p.add(i, now=2.0, deadline=FAR)
    assert not p.ready(2.0)
    assert p.take(2.01) == ([0, 1, 2, 3], [])
    # Expired requests still leave as misses, and the flush takes what is runnable.
    p.drain()
    p.add(100, now=3.0, deadline=3.005)
    for i in range(5):
        p.add(i, now=3.0, deadline=FAR)
    p.flush()
    assert p.take(3.01) == ([0, 1, 2, 3, 4], [100])


@pytest.mark.parametrize("kwargs", [
    {"max_batch": 0},
    {"max_wait_s": -0.001},
    {"max_wait_s": float("nan")},
    {"preferred_batch_sizes": (0, 2)},
    {"preferred_batch_sizes": (4, 2)},
    {"preferred_batch_sizes": (2, 2)},
    {"preferred_batch_sizes": (2, 16)},
])
def test_policy_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)  # type: ignore[arg-type]


ops = st.lists(st.tuples(
    st.sampled_from(["add", "add", "add", "take"]),
    st.floats(0.0, 0.02),  # time step
    st.floats(-0.02, 0.1),  # deadline from now
    st.integers(0, 2),  # priority
), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops=ops, max_batch=st.integers(1, 6), max_wait_s=st.sampled_from([0.0, 0.01, 0.05]),
       preferred=st.lists(st.integers(1, 6), unique=True, max_size=3))
def test_policy_never_loses_or_duplicates(ops: list[tuple[str, float, float, int]],
                                          max_batch: int, max_wait_s: float,
                                          preferred: list[int]) -> None:
    sizes = tuple(sorted(s for s in preferred if s <= max_batch))
    p: BatchPolicy[int] = BatchPolicy(max_batch, max_wait_s, sizes)
    now = 0.0
    keys: dict[int, tuple[float, int, int]] = {}
    out: list[int] = []
    for op, step, dl, prio in ops:
        now += step
        if op == "add":
            i = len(keys)
            keys[i] = (now + dl, -prio, i)
            p.add(i, now=now, deadline=now + dl, priority=prio)
        else:
            before = len(p)
            batch, expired = p.take(now)
            assert all(keys[i][0] <= now for i in expired)
            assert all(keys[i][0] > now for i in batch)
            assert len(batch) <= max_batch
            assert [keys[i] for i in batch] == sorted(keys[i] for i in batch)
            assert len(p) == before - len(batch) - len(expired)
            out += batch + expired
        wake = p.next_wakeup(now)
        assert (wake is None) == (len(p) == 0)
        assert p.ready(now) == (wake == now)
    out += p.drain()
    assert sorted(out) == list(keys)


# -- the shell -------------------------------------------------------------------------


async def test_releases_a_full_batch_without_waiting() -> None:
    model = Model()
    async with MicroBatcher(model, max_batch=8, max_wait_ms=10_000) as b:
        loop = asyncio.get_running_loop()
        results = await asyncio.wait_for(asyncio.gather(
            *(b.submit(i, deadline=loop.time() + 60) for i in range(8))), WAIT)
        assert results == [2 * i for i in range(8)]
        assert [len(x) for x in model.batches] == [8]
        assert b.stats()["batches"] == 1 and b.stats()["mean_batch_size"] == 8


async def test_releases_a_partial_batch_after_max_wait() -> None:
    model = Model()
    async with MicroBatcher(model, max_batch=8, max_wait_ms=50) as b:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.wait_for(asyncio.gather(
            *(b.submit(i, deadline=loop.time() + 60) for i in range(3))), WAIT)
        elapsed = loop.time() - t0
        assert results == [0, 2, 4]
        assert model.batches == [[0, 1, 2]]
        assert 0.05 <= elapsed < 1.0


async def test_batches_leave_in_deadline_order() -> None:
    model = Model(sleep_s=0.005)
    async with MicroBatcher(model, max_batch=2, max_wait_ms=0) as b:
        now = asyncio.get_running_loop().time()
        reqs = [1, 2, 3, 4, 5, 6]
        offsets = [50, 10, 40, 20, 30, 30]
        prios = [0, 0, 0, 0, 0, 1]  # 5 and 6 share a deadline: 6 has priority
        futs = submit_all(b, reqs, [now + o for o in offsets], prios)
        assert await asyncio.wait_for(asyncio.gather(*futs), WAIT) == [2 * r for r in reqs]
        assert model.batches == [[2, 4], [6, 5], [3, 1]]


async def test_expired_request_gets_deadline_miss() -> None:
    registry = CollectorRegistry()
    metrics = BatcherMetrics(registry, max_batch=8)
    gate = threading.Event()
    model = Model(gate=gate)
    async with MicroBatcher(model, max_batch=8, max_wait_ms=0, name="lips",
                            metrics=metrics) as b:
        loop = asyncio.get_running_loop()
        with pytest.raises(DeadlineMiss):
            await asyncio.wait_for(b.submit(1, deadline=loop.time() - 0.001), WAIT)
        # A deadline that passes while an earlier batch holds the model.
        first = asyncio.ensure_future(b.submit(2, deadline=loop.time() + 60))
        await asyncio.to_thread(model.started.wait, 2.0)
        waiting = asyncio.ensure_future(b.submit(3, deadline=loop.time() + 0.02))
        await asyncio.sleep(0.05)
        gate.set()
        assert await asyncio.wait_for(first, WAIT) == 4
        with pytest.raises(DeadlineMiss):
            await asyncio.wait_for(waiting, WAIT)
        assert model.batches == [[2]]  # the model never saw 1 or 3
        assert b.stats()["misses"] == 2
        assert registry.get_sample_value(
            "batch_deadline_misses_total", {"model": "lips"}) == 2


async def test_failing_batch_fails_only_its_own_requests() -> None:
    model = Model(fail=lambda r: r == 13)
    async with MicroBatcher(model, max_batch=2, max_wait_ms=0) as b:
        now = asyncio.get_running_loop().time()
        futs = submit_all(b, [13, 1, 2, 3], [now + 1, now + 2, now + 3, now + 4])
        answers = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), WAIT)
        assert model.batches == [[13, 1], [2, 3]]
        for a in answers[:2]:
            assert isinstance(a, BatchError)
            assert isinstance(a.__cause__, ValueError) and a.batch_size == 2
        assert answers[0] is not answers[1]
        assert answers[2:] == [4, 6]
        # ...and it goes on serving.
        assert await asyncio.wait_for(b.submit(5, deadline=now + 60), WAIT) == 10
        s = b.stats()
        assert (s["failures"], s["failed_requests"], s["batches"]) == (1, 2, 3)


async def test_wrong_number_of_results_is_a_batch_error() -> None:
    model = Model(short=lambda r: r == 7)
    async with MicroBatcher(model, max_batch=3, max_wait_ms=0) as b:
        now = asyncio.get_running_loop().time()
        answers = await asyncio.wait_for(asyncio.gather(
            *submit_all(b, [7, 8, 9], [now + 60] * 3), return_exceptions=True), WAIT)
        assert all(isinstance(a, BatchError) for a in answers)
        assert "2 results for 3 requests" in str(answers[0])
        assert await asyncio.wait_for(b.submit(1, deadline=now + 60), WAIT) == 2


async def test_aclose_answers_the_queue_and_waits_for_the_running_batch() -> None:
    gate = threading.Event()
    model = Model(gate=gate)
    b: MicroBatcher[int, int] = MicroBatcher(model, max_batch=1, max_wait_ms=0,
                                             name="closing")
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(b.submit(1, deadline=loop.time() + 60))
    await asyncio.to_thread(model.started.wait, 2.0)
    queued = submit_all(b, [2, 3, 4], [loop.time() + 60] * 3)
    closing = asyncio.ensure_future(b.aclose())
    answers = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 1.0)
    assert all(isinstance(a, BatcherClosed) for a in answers)
    await asyncio.sleep(0.02)
    assert not closing.done()  # still waiting for the batch in the model
    gate.set()
    await asyncio.wait_for(closing, 2.0)
    assert await asyncio.wait_for(running, WAIT) == 2
    with pytest.raises(BatcherClosed):
        await asyncio.wait_for(b.submit(5, deadline=loop.time() + 60), WAIT)
    await b.aclose()  # idempotent
    assert model.batches == [[1]]
    assert b.stats()["closed_requests"] == 4
    assert not [t for t in threading.enumerate() if t.name.startswith("batcher-closing")]


async def test_event_loop_runs_while_the_model_does() -> None:
    model = Model(sleep_s=0.2)
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0.01)

    async with MicroBatcher(model, max_wait_ms=0, name="lipsync") as b:
        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.02)
        before = ticks
        deadline = asyncio.get_running_loop().time() + 60
        assert await asyncio.wait_for(b.submit(21, deadline=deadline), WAIT) == 42
        during = ticks - before
        stop = True
        await t
    assert during >= 5  # ~20 expected; a blocked loop would give 0 or 1
    assert len(model.threads) == 1
    assert next(iter(model.threads)).startswith("batcher-lipsync")


async def test_metrics_and_stats() -> None:
    registry = CollectorRegistry()
    metrics = BatcherMetrics(registry, max_batch=4)
    model = Model(fail=lambda r: r < 0)
    async with MicroBatcher(model, max_batch=4, max_wait_ms=0, name="m",
                            metrics=metrics) as b:
        now = asyncio.get_running_loop().time()
        await asyncio.wait_for(asyncio.gather(*submit_all(b, [1, 2, 3, 4, 5], [now + 60] * 5)),
                               WAIT)
        await asyncio.wait_for(asyncio.gather(*submit_all(b, [-1], [now + 60]),
                                              return_exceptions=True), WAIT)
        s = b.stats()
    labels = {"model": "m"}

    def value(name: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert s["batches"] == 3 and s["requests"] == 6 and s["batched_requests"] == 6
    assert s["failures"] == 1 and s["queue_depth"] == 0 and s["in_flight"] == 0
    assert s["mean_batch_size"] == 2.0 and s["last_batch_ms"] >= 0.0
    assert value("batch_size_count") == 3 and value("batch_size_sum") == 6
    assert registry.get_sample_value("batch_size_bucket", {"model": "m", "le": "4.0"}) == 3
    assert value("batch_queue_wait_seconds_count") == 6
    assert value("batch_run_seconds_count") == 2  # the failed batch has no run time
    assert value("batch_failures_total") == 1
    assert value("gpu_memory_errors_total") == 0  # a ValueError is not the device's memory
    assert value("batch_deadline_misses_total") == 0


@pytest.mark.parametrize(("error", "memory"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code "
                  "returned while running Conv node. Failed to allocate memory for requested "
                  "buffer of size 9437184"), True),
    (RuntimeError("CUDA error: CUDA_ERROR_OUT_OF_MEMORY"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("bad input"), False),
])
def test_memory_errors_are_told_apart(error: BaseException, memory: bool) -> None:
    assert is_memory_error(error) is memory
    # Wrapped (raise ... from ...) as a runtime's own error: still found.
    try:
        try:
            raise error
        except BaseException as inner:
            raise RuntimeError("batch failed") from inner
    except RuntimeError as outer:
        assert is_memory_error(outer) is memory


@pytest.mark.parametrize("kwargs", [
    {"max_batch": 0},
    {"max_wait_ms": -1.0},
    {"preferred_batch_sizes": (0,)},
    {"preferred_batch_sizes": (4, 2)},
    {"max_batch": 4, "preferred_batch_sizes": (2, 8)},
])
def test_shell_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(Model(), **kwargs)  # type: ignore[arg-type]


async def test_callback_that_raises_does_not_hurt_the_others() -> None:
    async with MicroBatcher(Model(), max_batch=2, max_wait_ms=0) as b:
        loop = asyncio.get_running_loop()
        good = loop.create_future()

        def bad(_req: int, _res: int | BaseException) -> None:
            raise RuntimeError("broken callback")

        b.submit_nowait(1, deadline=loop.time() + 60, callback=bad)
        b.submit_nowait(2, deadline=loop.time() + 60,
                        callback=lambda _r, res: good.set_result(res))
        assert await asyncio.wait_for(good, 2.0) == 4


# -- a storm of streams ----------------------------------------------------------------


@dataclass(frozen=True)
class Storm:
    max_batch: int
    preferred: tuple[int, ...]
    max_wait_ms: float
    streams: list[list[tuple[float, float, int]]]  # per request: delay ms, deadline ms, prio
    poison_mod: int | None
    short_mod: int | None
    sleep_ms: float
    close_after_ms: float | None


@st.composite
def storms(draw: st.DrawFn) -> Storm:
    max_batch = draw(st.integers(1, 8))
    preferred = tuple(sorted(draw(st.lists(st.integers(1, max_batch), unique=True,
                                           max_size=3))))
    request = st.tuples(st.sampled_from([0.0, 0.0, 0.5, 1.0, 3.0]),
                        st.sampled_from([-5.0, 0.0, 1.0, 5.0, 20.0, 100.0, 1000.0]),
                        st.integers(0, 2))
    return Storm(
        max_batch=max_batch,
        preferred=preferred,
        max_wait_ms=draw(st.sampled_from([0.0, 1.0, 4.0])),
        streams=draw(st.lists(st.lists(request, min_size=1, max_size=8), min_size=1,
                              max_size=12)),
        poison_mod=draw(st.sampled_from([None, 7, 13])),
        short_mod=draw(st.sampled_from([None, 11])),
        sleep_ms=draw(st.sampled_from([0.0, 0.5, 1.0])),
        close_after_ms=draw(st.sampled_from([None, None, 0.0, 2.0, 5.0])),
    )


async def run_storm(storm: Storm) -> None:
    loop = asyncio.get_running_loop()
    poison, short = storm.poison_mod, storm.short_mod
    model = Model(sleep_s=storm.sleep_ms / 1000,
                  fail=(lambda r: r % poison == 0) if poison else None,
                  short=(lambda r: r % short == 1) if short else None)
    registry = CollectorRegistry()
    b: MicroBatcher[int, int] = MicroBatcher(
        model, max_batch=storm.max_batch, max_wait_ms=storm.max_wait_ms,
        preferred_batch_sizes=storm.preferred, name="storm",
        metrics=BatcherMetrics(registry, max_batch=8))
    total = sum(len(s) for s in storm.streams)
    answers: dict[int, list[int | BaseException]] = defaultdict(list)
    answered_at: dict[int, float] = {}
    deadlines: dict[int, float] = {}
    lead: dict[int, float] = {}
    all_in = asyncio.Event()
    count = 0

    def callback(req: int, res: int | BaseException) -> None:
        nonlocal count
        answers[req].append(res)
        answered_at[req] = loop.time()
        count += 1
        if count >= total:
            all_in.set()

    async def stream(i: int, reqs: list[tuple[float, float, int]]) -> None:
        for k, (delay_ms, deadline_ms, prio) in enumerate(reqs):
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            rid = 100 * i + k
            deadlines[rid] = loop.time() + deadline_ms / 1000
            lead[rid] = deadline_ms
            b.submit_nowait(rid, deadline=deadlines[rid], callback=callback, priority=prio)

    streams = asyncio.gather(*(stream(i, reqs) for i, reqs in enumerate(storm.streams)))
    if storm.close_after_ms is not None:
        await asyncio.sleep(storm.close_after_ms / 1000)
        await b.aclose()
    await streams
    await asyncio.wait_for(all_in.wait(), 10.0)
    await b.aclose()
    await asyncio.sleep(0.005)  # room for a duplicate answer to show up

    assert sorted(answers) == sorted(deadlines) and len(deadlines) == total
    assert all(len(a) == 1 for a in answers.values()), "a request was answered twice"
    result = {r: a[0] for r, a in answers.items()}
    ok = {r for r, a in result.items() if not isinstance(a, BaseException)}
    missed = {r for r, a in result.items() if isinstance(a, DeadlineMiss)}
    failed = {r for r, a in result.items() if isinstance(a, BatchError)}
    closed = {r for r, a in result.items() if isinstance(a, BatcherClosed)}
    assert len(ok) + len(missed) + len(failed) + len(closed) == total
    if storm.close_after_ms is None:
        assert not closed
    assert all(result[r] == 2 * r for r in ok)
    assert all(deadlines[r] <= answered_at[r] for r in missed)
    assert all(r in missed or r in closed for r in deadlines if lead[r] <= 0)

    seen = [r for batch in model.batches for r in batch]
    assert len(seen) == len(set(seen)), "a request reached the model twice"
    assert set(seen) == ok | failed
    assert sum(len(batch) for batch in model.batches) == len(ok) + len(failed)
    pref = storm.preferred
    for batch in model.batches:
        n = len(batch)
        assert 1 <= n <= storm.max_batch
        assert n == storm.max_batch or not pref or n in pref or n < pref[0]
        bad = any((poison and r % poison == 0) or (short and r % short == 1) for r in batch)
        assert set(batch) <= (failed if bad else ok)

    s = b.stats()
    assert s["requests"] == total and s["batched_requests"] == len(seen)
    assert (s["misses"], s["failed_requests"], s["closed_requests"]) == (
        len(missed), len(failed), len(closed))
    assert s["batches"] == len(model.batches) and s["queue_depth"] == 0
    labels = {"model": "storm"}
    assert registry.get_sample_value("batch_deadline_misses_total", labels) == len(missed)
    assert registry.get_sample_value("batch_size_sum", labels) == len(seen)
    assert registry.get_sample_value("batch_failures_total", labels) == s["failures"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(storm=storms())
def test_storm_of_streams_loses_and_duplicates_nothing(storm: Storm) -> None:
    asyncio.run(run_storm(storm))


async def test_two_batches_in_flight_run_at_once_and_all_are_answered() -> None:
    """With max_in_flight=2 a second batch starts while the first is still in the
    model: a run_batch that waits for a partner only finishes if both run together."""

    partner = threading.Barrier(2, timeout=5)
    concurrent = []

    def run(reqs: list[int]) -> list[int]:
        try:
            partner.wait()
            concurrent.append(True)
        except threading.BrokenBarrierError:
            concurrent.append(False)
        return [r * 10 for r in reqs]

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch=2, max_wait_ms=0,
                                                   max_in_flight=2)
    async with batcher:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(batcher.submit(i, deadline=loop.time() + 10) for i in range(4)))
        assert results == [0, 10, 20, 30]
        assert concurrent[:2] == [True, True]
        assert batcher.stats()["in_flight"] == 0


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda reqs: reqs, max_in_flight=0)
