"""Arrival-delay statistics for the jitter buffer, in O(1) per arrival.

Every chunk a stream receives updates both of these, so they run a few thousand times a
second per node, on the event loop, holding the GIL. The plain forms (a scan of the
window for its minimum, a histogram scaled and summed per arrival) cost about 15 µs a
chunk and were the largest single item in ``bench --profile``; these give the same
answers (``tests/test_arrival.py`` checks them against the plain forms on random traces)
for a few µs.
"""

from __future__ import annotations

import math
from collections import deque


class WindowMin:
    """The minimum of values seen over the last ``window_s`` seconds.

    A monotonic deque: a value is dropped as soon as a newer one is no larger (it can
    never be the minimum again), so the front is always the window's minimum. Times must
    not go backwards."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._q: deque[tuple[float, float]] = deque()

    def push(self, t: float, value: float) -> float:
        """Add ``value`` seen at ``t``; returns the minimum over ``(t - window_s, t]``
        (a value exactly ``window_s`` old still counts)."""
        q = self._q
        while q and q[-1][1] >= value:
            q.pop()
        q.append((t, value))
        while t - q[0][0] > self.window_s:
            q.popleft()
        return q[0][1]

    def clear(self) -> None:
        self._q.clear()


class WindowMax:
    """The maximum of values seen over the last ``window_s`` seconds, readable at any time
    (values older than the window are dropped as time moves on). The mirror of
    :class:`WindowMin`; times must not go backwards."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._q: deque[tuple[float, float]] = deque()

    def push(self, t: float, value: float) -> None:
        q = self._q
        while q and q[-1][1] <= value:
            q.pop()
        q.append((t, value))

    def value(self, t: float) -> float | None:
        """The maximum over ``(t - window_s, t]`` (None if nothing was seen in it)."""
        q = self._q
        while q and t - q[0][0] > self.window_s:
            q.popleft()
        return q[0][1] if q else None


class ForgettingQuantile:
    """A quantile of a histogram of values that forgets exponentially.

    Each :meth:`add` first scales every bin by ``forget`` and then adds ``1 - forget`` to
    the value's bin; :attr:`value` is the upper edge of the first bin whose cumulative
    weight reaches ``quantile`` of the total (the bins are ``[0, w), [w, 2w), ...``; a
    value past the last bin counts in the last).

    Scaling every bin is done lazily: the bins hold weights divided by the product of the
    forgets so far (renormalised long before that overflows), so an add touches one bin.
    The quantile's bin moves from where it was, a bin or two per add, against a running
    cumulative weight instead of summing the histogram each time.

    With ``start_weight`` (WebRTC NetEQ's ``start_forget_weight``, 2 in its delay
    manager) the first adds forget faster than asked, as NetEQ's histogram does after a
    reset: the ``k``-th add (from 0) forgets by at most ``1 - start_weight / (k + 1)``
    (0 for the first, which replaces the seed outright), so early on the histogram is
    close to the plain distribution of what has been seen, rather than a seed that fades
    only at the steady rate (6.5 s of speech, at the jitter buffer's half-life of 1.5 s,
    before a seed holding the quantile lets go)."""

    _RENORM = 1e-150

    def __init__(self, bins: int, bin_width: float, quantile: float, seed: float,
                 start_weight: float | None = None) -> None:
        """``seed``: the initial value; all the weight starts in the bin whose upper edge
        is ``seed`` (rounded up to a bin edge), so :attr:`value` is ``seed`` until adds
        move it."""
        if start_weight is not None and not start_weight >= 1.0:
            raise ValueError(f"start_weight must be >= 1, got {start_weight}")
        self._n = bins
        self._width = bin_width
        self._quantile = quantile
        self._start_weight = start_weight
        self._adds = 0
        self._w = [0.0] * bins
        seed_bin = min(bins - 1, max(0, math.ceil(seed / bin_width) - 1))
        self._w[seed_bin] = 1.0
        self._total = 1.0
        self._scale = 1.0  # true weight = stored weight * _scale
        self._q = seed_bin
        self._cum = 1.0  # stored weight of bins 0 .. _q

    @property
    def value(self) -> float:
        return (self._q + 1) * self._width

    def add(self, value: float, forget: float) -> float:
        """Forget by ``forget`` (0 < forget < 1), count ``value``; returns :attr:`value`."""
        k = self._adds
        self._adds = k + 1
        if self._start_weight is not None:
            if k == 0:
                return self._restart(value)
            forget = min(forget, max(0.0, 1.0 - self._start_weight / (k + 1)))
            if forget <= 0.0:
                return self._restart(value)
        self._scale *= forget
        if self._scale < self._RENORM:
            self._renormalise()
        inc = (1.0 - forget) / self._scale
        b = min(self._n - 1, int(value / self._width))
        w = self._w
        w[b] += inc
        self._total += inc
        q, cum = self._q, self._cum
        if b <= q:
            cum += inc
        threshold = self._quantile * self._total
        while cum < threshold and q < self._n - 1:
            q += 1
            cum += w[q]
        while q > 0 and cum - w[q] >= threshold:
            cum -= w[q]
            q -= 1
        self._q, self._cum = q, cum
        return (q + 1) * self._width

    @property
    def adds(self) -> int:
        """Values counted so far."""
        return self._adds

    def _restart(self, value: float) -> float:
        # Forgetting by 0: everything before is gone, the histogram is this value alone.
        b = min(self._n - 1, int(value / self._width))
        self._w = [0.0] * self._n
        self._w[b] = 1.0
        self._total = self._cum = self._scale = 1.0
        self._q = b
        return (b + 1) * self._width

    def _renormalise(self) -> None:
        s = self._scale
        self._w = [x * s for x in self._w]
        self._scale = 1.0
        self._total = sum(self._w)
        # Sums restart exact here, so running-sum rounding never builds up.
        self._cum = sum(self._w[: self._q + 1])
