"""Pitch-period time-stretching of speech, after WebRTC NetEQ's accelerate and preemptive
expand: shorten or lengthen a block of audio by whole pitch periods, so the pitch stays.

Pure and stateless: a function of the block it is given, tested by feeding signals and
measuring what comes out. About 0.12 ms per block searched (40 ms of speech, one core of
the 2.8 GHz Xeon the project benches on), and a block is searched only when the jitter
buffer has decided to stretch it. The jitter buffer (:mod:`rapido.pipeline.jitter`) decides when
and how much; this module only says how.

The method (NetEQ's ``TimeStretch``, simplified):

* **Pitch search.** Normalised cross-correlation of the block's first ``MAX_LAG_MS`` with
  the same length starting ``lag`` later, for lags of 2.5-15 ms (400-67 Hz), first on a
  signal decimated 4x (a boxcar mean: cheap, and pitch lies far below its cut-off), then
  refined at full rate around the best decimated lag. Of the lags within 3 % of the best
  correlation the shortest wins, so a period, not a multiple of it, is taken.
* **Accelerate** removes one period ``P`` at the block's start: the output is a cross-fade
  from ``x[0:P]`` into ``x[P:2P]``, then ``x[2P:]``. The fade starts on the block's first
  sample and ends on the sample before ``x[2P]``, so both joins are seamless, and where
  the signal is periodic the fade mixes two near-identical periods: the pitch is kept.
* **Preemptive expand** inserts one: ``x[0:P]``, a cross-fade from ``x[P:2P]`` into
  ``x[0:P]``, then ``x[P:]``.
* **Extend** lengthens audio that is already final (heard, or read by a look-ahead) without
  changing any of it: ``x`` followed by a repeat of its last period. The repeat ends on
  ``x``'s last sample, so whatever comes next follows as it would have followed ``x``; its
  start continues ``x`` as far as ``x`` is periodic (the period is searched on ``x``'s end).
* Only where the signal is periodic enough (correlation >= 0.9, NetEQ's threshold) or so
  quiet that nothing can be heard either way; otherwise the block passes unchanged.

Outside the cross-fade every output sample is an input sample, in order: a block loses or
gains exactly ``period`` samples, no more (the tests check it sample by sample).

Why our own and not a library: ``audiostretchy`` (David Bryant's audio-stretch, BSD) ships
one prebuilt x86-64 Linux ``.so`` inside a ``py3-none-any`` wheel (no aarch64, no source
build) behind a ctypes wrapper that pulls in ``fire``, and it stretches at a *ratio* with
an internal buffer of up to two longest periods, so output lags input by a varying amount
and a 40 ms frame cannot be taken from it exactly, nor a played sample be mapped back to
its source sample. Rubber Band (``pylibrb``) is GPL. The pitch-period method is about a
hundred lines of numpy, block-exact, and decides per block, which is what a jitter buffer
that must stay frame-accurate needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CORRELATION_MIN",
    "MAX_LAG_MS",
    "MIN_LAG_MS",
    "Stretched",
    "accelerate",
    "expand",
    "extend",
    "min_block",
    "time_stretch",
]

MIN_LAG_MS = 2.5
MAX_LAG_MS = 15.0
#: NetEQ's threshold (kCorrelationThreshold, 0.9 in Q14) for stretching voiced audio.
CORRELATION_MIN = 0.9
#: Below this RMS (int16; about -54 dBFS) a block is treated as silence: any cut is inaudible.
QUIET_RMS = 64.0
_DECIMATE = 4
_NEAR_BEST = 0.97  # lags within 3 % of the best correlation count as the best


@dataclass(frozen=True, slots=True)
class Stretched:
    audio: np.ndarray  # int16: the block as it will be played
    period: int  # samples removed (accelerate) or inserted (expand); 0 when unchanged
    correlation: float  # of the period found (1.0 for a quiet block)


def min_block(rate: int) -> int:
    """The shortest block :func:`accelerate` and :func:`expand` will change: two longest
    periods (30 ms), enough to compare a period with the next at every lag."""
    return 2 * _lag(rate, MAX_LAG_MS)


def accelerate(x: np.ndarray, rate: int, max_period: int | None = None) -> Stretched:
    """``x`` shortened by one pitch period (at most ``max_period`` samples), or unchanged
    where it is neither periodic nor quiet, or shorter than :func:`min_block`."""
    period, corr = _find_period(x, rate, max_period)
    if period == 0:
        return Stretched(x, 0, corr)
    fade = _crossfade(x[:period], x[period : 2 * period])
    return Stretched(np.concatenate([fade, x[2 * period :]]), period, corr)


def expand(x: np.ndarray, rate: int, max_period: int | None = None) -> Stretched:
    """``x`` lengthened by one pitch period; otherwise as :func:`accelerate`."""
    period, corr = _find_period(x, rate, max_period)
    if period == 0:
        return Stretched(x, 0, corr)
    fade = _crossfade(x[period : 2 * period], x[:period])
    return Stretched(np.concatenate([x[:period], fade, x[period:]]), period, corr)


def extend(x: np.ndarray, rate: int, max_period: int | None = None) -> Stretched:
    """``x`` followed by a repeat of its last pitch period; ``x`` itself unchanged. For
    audio that must not change any more; otherwise as :func:`expand`."""
    period, corr = _find_period(x[::-1], rate, max_period)
    if period == 0:
        return Stretched(x, 0, corr)
    return Stretched(np.concatenate([x, x[len(x) - period :]]), period, corr)


def time_stretch(x: np.ndarray, rate: int, factor: float, block_ms: float = 40.0
                 ) -> tuple[np.ndarray, list[tuple[int, Stretched]]]:
    """A whole signal played ``factor`` times as long (0.9: 10 % faster), block by block,
    a period at a time wherever the output has fallen behind the factor. Returns the
    output and, per changed block, its start in ``x`` and what was done. For tests and
    offline use; the jitter buffer makes its own decisions block by block."""
    block = max(min_block(rate), round(block_ms * rate / 1000.0))
    parts: list[np.ndarray] = []
    ops: list[tuple[int, Stretched]] = []
    produced = 0
    for start in range(0, len(x), block):
        seg = x[start : start + block]
        goal = factor * (start + len(seg))
        out = Stretched(seg, 0, 0.0)
        if len(seg) >= min_block(rate):
            # One direction only: overshooting and coming back would cut twice as often.
            if factor < 1.0 and produced + len(seg) > goal:
                out = accelerate(seg, rate)
            elif factor > 1.0 and produced + len(seg) < goal:
                out = expand(seg, rate)
        if out.period:
            ops.append((start, out))
        parts.append(out.audio)
        produced += len(out.audio)
    audio = np.concatenate(parts) if parts else x[:0]
    return audio, ops


# -- helpers ------------------------------------------------------------------------------


def _lag(rate: int, ms: float) -> int:
    return round(ms * rate / 1000.0)


def _find_period(x: np.ndarray, rate: int, max_period: int | None) -> tuple[int, float]:
    """(period, correlation) of ``x``'s start; period 0 where it must not be changed."""
    lo, hi = _lag(rate, MIN_LAG_MS), _lag(rate, MAX_LAG_MS)
    if max_period is not None:
        hi = min(hi, max_period)
    win = _lag(rate, MAX_LAG_MS)
    if len(x) < 2 * win or hi < lo:
        return 0, 0.0
    xf = x[: 2 * win].astype(np.float64)
    if float(np.sqrt(np.mean(xf * xf))) < QUIET_RMS:
        # Silence inside an utterance (a pause between words): nothing to keep in tune,
        # and the longest allowed cut drains the most.
        return hi, 1.0
    # Coarse search on the decimated signal.
    d = _DECIMATE
    xd = xf[: len(xf) // d * d].reshape(-1, d).mean(axis=1)
    dlo, dhi, dwin = max(1, lo // d), hi // d, win // d
    corr_d = _ncc(xd, dwin, dlo, dhi)
    top = float(corr_d.max())
    if top < CORRELATION_MIN * _NEAR_BEST:
        return 0, top
    # Refine at full rate around the local peaks near the best, shortest first: the
    # first good one is a period, where the best alone might be a multiple of it.
    c = corr_d
    peak = np.ones(len(c), dtype=bool)
    peak[1:] &= c[1:] >= c[:-1]
    peak[:-1] &= c[:-1] >= c[1:]
    near = dlo + np.flatnonzero(peak & (c >= _NEAR_BEST * top))
    best_c = -1.0
    for cand in near[:3]:
        a, b = max(lo, int(cand) * d - d), min(hi, int(cand) * d + d)
        corr = _ncc(xf, win, a, b)
        k = int(np.argmax(corr))
        if corr[k] >= CORRELATION_MIN:
            return a + k, float(corr[k])
        best_c = max(best_c, float(corr[k]))
    return 0, best_c


def _ncc(x: np.ndarray, win: int, lo: int, hi: int) -> np.ndarray:
    """Normalised correlation of ``x[0:win]`` with ``x[lag:lag+win]`` for ``lo..hi``."""
    ref = x[:win]
    seg = x[: hi + win]
    dots = np.correlate(seg[lo:], ref, mode="valid")[: hi - lo + 1]
    sq = np.concatenate([[0.0], np.cumsum(seg * seg)])
    energy = sq[lo + win : hi + win + 1] - sq[lo : hi + 1]
    e0 = float(ref @ ref)
    return np.asarray(dots / np.sqrt(np.maximum(energy * e0, 1e-9)))


def _crossfade(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` fading out while ``b`` fades in, linearly; the first sample is nearly ``a``'s
    and the last nearly ``b``'s, so the samples either side join without a step."""
    n = len(a)
    w = np.arange(1, n + 1, dtype=np.float64) / (n + 1)
    mixed = a.astype(np.float64) * (1.0 - w) + b.astype(np.float64) * w
    return np.clip(np.rint(mixed), -32768, 32767).astype(np.int16)
