"""The shared encoder pool: per-lane order, one thread per lane at a time, bounds."""

from __future__ import annotations

import os
import threading
import time

import pytest

from rapido.pipeline.sinks.base import ENCODER_NICE, SinkError
from rapido.pipeline.sinks.pool import EncoderPool


def test_each_lane_keeps_its_order_and_never_runs_on_two_threads_at_once() -> None:
    pool = EncoderPool(3)
    seen: dict[str, list[int]] = {}
    busy: dict[str, int] = {}
    overlap: list[str] = []
    guard = threading.Lock()

    def handler_for(name: str):  # type: ignore[no-untyped-def]
        def handle(i: int) -> None:
            with guard:
                busy[name] = busy.get(name, 0) + 1
                if busy[name] > 1:
                    overlap.append(name)
            time.sleep(0.0005)
            seen.setdefault(name, []).append(i)
            with guard:
                busy[name] -= 1
        return handle

    lanes = {n: pool.lane(handler_for(n), max_queue=1000, name=n) for n in "abcdef"}
    for i in range(200):
        for lane in lanes.values():
            assert lane.put(i)
    for lane in lanes.values():
        assert lane.join(timeout=30)
    pool.close()
    assert overlap == []
    assert all(seen[n] == list(range(200)) for n in lanes)


def test_a_busy_lane_does_not_starve_the_others() -> None:
    pool = EncoderPool(1)
    order: list[str] = []
    queued = threading.Event()  # the slow lane waits until both lanes hold their work,
    # so a preempted test thread cannot let it run ahead before the fast item is put

    def slow_work(i: int) -> None:
        queued.wait(10)
        time.sleep(0.001)
        order.append("slow")

    slow = pool.lane(slow_work, max_queue=100, name="slow")
    fast = pool.lane(lambda i: order.append("fast"), max_queue=100, name="fast")
    for i in range(40):
        slow.put(i)
    fast.put(0)
    queued.set()
    assert fast.join(timeout=10) and slow.join(timeout=10)
    pool.close()
    # The fast lane's one item ran long before the slow lane's 40 were through.
    assert order.index("fast") < 20


def test_full_lane_refuses_and_clear_drops_pending() -> None:
    pool = EncoderPool(1)
    gate, took = threading.Event(), threading.Event()
    done: list[int] = []

    def handle(i: int) -> None:
        took.set()
        gate.wait(10)
        done.append(i)

    lane = pool.lane(handle, max_queue=3, name="gated")
    assert lane.put(0)
    assert took.wait(5)  # the worker took 0 and waits at the gate
    assert [lane.put(i) for i in (1, 2, 3, 4)] == [True, True, True, False]
    assert lane.qsize() == 3
    assert len(lane.clear()) == 3
    gate.set()
    assert lane.join(timeout=10)
    pool.close()
    assert done == [0]


def test_a_failing_item_does_not_stop_its_lane_or_the_pool() -> None:
    pool = EncoderPool(1)
    done: list[int] = []

    def handle(i: int) -> None:
        if i == 2:
            raise RuntimeError("boom")
        done.append(i)

    lane = pool.lane(handle, max_queue=10, name="faulty")
    for i in range(5):
        lane.put(i)
    assert lane.join(timeout=10)
    pool.close()
    assert done == [0, 1, 3, 4]


def test_bad_settings_and_closed_pool() -> None:
    with pytest.raises(ValueError):
        EncoderPool(0)
    pool = EncoderPool(1)
    with pytest.raises(ValueError):
        pool.lane(lambda i: None, max_queue=0, name="x")
    pool.close()
    with pytest.raises(SinkError):
        pool.lane(lambda i: None, max_queue=1, name="x")


def test_close_finishes_every_queued_item_then_refuses_more() -> None:
    """A lane with more than a burst queued requeues itself behind the stop markers;
    close() must still see it through, or its sink's join() would wait forever."""
    pool = EncoderPool(1)
    done: list[int] = []
    def work(i: int) -> None:
        time.sleep(0.002)
        done.append(i)

    lane = pool.lane(work, max_queue=100, name="long")
    for i in range(10):
        assert lane.put(i)
    pool.close()
    assert done == list(range(10))
    assert lane.join(timeout=1)
    assert lane.put(10) is False and lane.qsize() == 0
    assert lane.join(timeout=1)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are Linux-only")
def test_workers_run_below_the_event_loop() -> None:
    pool = EncoderPool(2)
    pool.lane(lambda i: None, max_queue=1, name="x")
    try:
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        for t in pool._workers:
            assert t.native_id is not None
            for _ in range(100):  # the worker sets its own priority as it starts
                if os.getpriority(os.PRIO_PROCESS, t.native_id) != mine:
                    break
                time.sleep(0.01)
            assert os.getpriority(os.PRIO_PROCESS, t.native_id) == min(19, mine + ENCODER_NICE)
    finally:
        pool.close()
