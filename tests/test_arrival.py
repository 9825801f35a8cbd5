"""The jitter buffer's O(1) delay statistics give what the plain forms give."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from rapido.pipeline.arrival import ForgettingQuantile, WindowMax, WindowMin


class _ScanMin:
    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.q: deque[tuple[float, float]] = deque()

    def push(self, t: float, v: float) -> float:
        self.q.append((t, v))
        while t - self.q[0][0] > self.window_s:
            self.q.popleft()
        return min(d for _, d in self.q)


class _NumpyQuantile:
    def __init__(self, bins: int, width: float, quantile: float, seed: float,
                 start_weight: float | None = None) -> None:
        self.start_weight, self.adds = start_weight, 0
        self.h = np.zeros(bins)
        self.h[min(bins - 1, max(0, math.ceil(seed / width) - 1))] = 1.0
        self.width, self.quantile = width, quantile

    def add(self, value: float, forget: float) -> float:
        if self.start_weight is not None:
            # NetEQ's Histogram::Add: the factor starts at 0 and ramps towards the
            # steady one as 1 - start_forget_weight / (adds + 1).
            k, self.adds = self.adds, self.adds + 1
            forget = 0.0 if k == 0 else min(forget, max(0.0, 1.0 - self.start_weight / (k + 1)))
        self.h *= forget
        self.h[min(len(self.h) - 1, int(value / self.width))] += 1.0 - forget
        cdf = np.cumsum(self.h)
        return (int(np.searchsorted(cdf, self.quantile * cdf[-1])) + 1) * self.width


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_window_min_matches_a_scan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fast, plain = WindowMin(2.0), _ScanMin(2.0)
    t = 0.0
    for i in range(20000):
        # Bursts, gaps longer than the window, equal times and equal values.
        t += float(rng.choice([0.0, 0.02, 0.02, 0.005, 0.3, 2.5]))
        v = float(rng.integers(-50, 50)) if i % 3 else float(rng.normal())
        assert fast.push(t, v) == plain.push(t, v)
        if i % 5000 == 4999:
            fast.clear()
            plain.q.clear()


@pytest.mark.parametrize("seed", [1, 2])
def test_window_max_matches_a_scan_read_at_any_time(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fast = WindowMax(5.0)
    seen: list[tuple[float, float]] = []
    t = 0.0
    for i in range(20000):
        t += float(rng.choice([0.0, 0.02, 0.02, 0.005, 0.3, 6.0]))
        if i % 4:  # pushes, and reads between them (later times evict on their own)
            v = float(rng.integers(-50, 50)) if i % 3 else float(rng.normal())
            fast.push(t, v)
            seen.append((t, v))
        seen = [(tv, v) for tv, v in seen if t - tv <= 5.0]
        assert fast.value(t) == (max(v for _, v in seen) if seen else None)


def test_window_max_keeps_a_value_exactly_window_old() -> None:
    w = WindowMax(1.0)
    assert w.value(0.0) is None
    w.push(0.0, 9.0)
    w.push(0.5, 7.0)
    assert w.value(1.0) == 9.0  # exactly 1 s old: still in
    assert w.value(1.2) == 7.0
    assert w.value(1.6) is None


def test_window_min_keeps_a_value_exactly_window_old() -> None:
    w = WindowMin(1.0)
    assert w.push(0.0, 5.0) == 5.0
    assert w.push(1.0, 7.0) == 5.0  # exactly 1 s old: still in
    assert w.push(1.5, 9.0) == 7.0


@pytest.mark.parametrize("seed", [1, 2])
def test_forgetting_quantile_matches_the_histogram(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fast = ForgettingQuantile(200, 5.0, 0.95, seed=100.0)
    plain = _NumpyQuantile(200, 5.0, 0.95, seed=100.0)
    assert fast.value == 100.0
    forget = 0.5 ** (0.02 / 1.5)
    # Long enough to pass several renormalisations (one every ~37 000 adds at this
    # forget), with quiet spells, spikes and values past the last bin.
    for i in range(80_000):
        phase = (i // 4000) % 4
        if phase == 0:
            v = abs(float(rng.normal(0, 3)))
        elif phase == 1:
            v = float(rng.exponential(40))
        elif phase == 2:
            v = float(rng.choice([0.0, 0.0, 0.0, 300.0, 2000.0]))
        else:
            v = float(rng.uniform(0, 1000))
        f = forget if i % 7 else 0.5 ** (float(rng.uniform(0.001, 0.2)) / 1.5)
        expected = plain.add(v, f)
        assert fast.add(v, f) == expected, i
        assert fast.value == expected


def test_forgetting_quantile_seed_and_movement() -> None:
    q = ForgettingQuantile(10, 10.0, 0.9, seed=35.0)
    assert q.value == 40.0  # the seed rounded up to a bin edge
    for _ in range(400):
        q.add(0.0, 0.9)
    assert q.value == 10.0  # forgot the seed
    for _ in range(400):
        q.add(1e9, 0.9)
    assert q.value == 100.0  # past the last bin counts in the last


@pytest.mark.parametrize("start_weight", [1.0, 2.0, 3.5])
def test_forgetting_quantile_start_ramp_matches_netEQs(start_weight: float) -> None:
    """With ``start_weight`` the first adds forget faster, as NetEQ's histogram does after
    a reset: answer for answer the dense form, through the ramp and long after it."""
    rng = np.random.default_rng(7)
    fast = ForgettingQuantile(200, 5.0, 0.95, seed=80.0, start_weight=start_weight)
    plain = _NumpyQuantile(200, 5.0, 0.95, seed=80.0, start_weight=start_weight)
    forget = 0.5 ** (0.02 / 1.5)
    for i in range(3000):
        v = abs(float(rng.normal(0, 10))) if i < 1500 else float(rng.exponential(60))
        f = forget if i % 5 else 0.5 ** (float(rng.uniform(0.005, 0.1)) / 1.5)
        expected = plain.add(v, f)
        assert fast.add(v, f) == expected, i
    assert fast.adds == 3000


def test_forgetting_quantile_first_add_replaces_the_seed() -> None:
    ramped = ForgettingQuantile(200, 5.0, 0.95, seed=80.0, start_weight=2.0)
    steady = ForgettingQuantile(200, 5.0, 0.95, seed=80.0)
    assert ramped.value == steady.value == 80.0
    assert ramped.add(3.0, 0.99) == 5.0  # the seed is gone at once
    assert steady.add(3.0, 0.99) == 80.0  # the seed holds the quantile
    # Without the ramp a seed holding 95 % lets go only after ln(0.05)/ln(f) adds.
    adds = 2  # the one above, and the one below that moves it
    while steady.add(3.0, 0.99) > 5.0:
        adds += 1
    assert adds == math.ceil(math.log(0.05) / math.log(0.99))  # 299


def test_forgetting_quantile_rejects_a_start_weight_below_one() -> None:
    with pytest.raises(ValueError, match="start_weight"):
        ForgettingQuantile(10, 5.0, 0.95, seed=0.0, start_weight=0.5)
