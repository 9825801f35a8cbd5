"""Lip-sync lag: how far a stream's mouth motion trails the loudness of its sound.

Measured on the output, as a viewer would judge it, with nothing known of the model:

* **mouth motion** at picture ``i`` is the mean absolute luma difference between pictures
  ``i - 1`` and ``i`` inside the mouth region; it happens at ``pts[i]``, when picture
  ``i`` replaces ``i - 1``;
* **audio change** at the same instant is ``|L(t) - L(t - d)|``, ``L(t)`` the loudness
  (dB of the RMS, floored 40 dB under the stream's loud parts) of the ``d`` = one frame
  interval of sound starting at ``t``. A picture shown over ``[pts, pts + d)`` whose
  mouth follows exactly the sound heard meanwhile moves when ``L`` changes at ``pts``;
* the two are Pearson-correlated with the audio shifted by every lag on a 1 ms grid
  (the grid, not the 40 ms frame spacing, sets the resolution: the audio is there at
  1 ms), and a parabola through the best point and its neighbours places the peak.

**Sign (the one place it is stated):** ``lag_ms > 0`` means the mouth moves *after* the
sound (video late, audio early); ``lag_ms < 0`` means the mouth moves *before* the sound
(video early, audio late). ITU-R BT.1359 puts detectability at +45 ms and -125 ms.

Both series are unsigned (opening and closing both count), so a mouth that follows
loudness through a compressive or expansive curve still peaks at the true lag: such a
curve moves an opening edge one way and the closing edge the other. The input must not be
periodic: a syllable train at a fixed rate correlates equally at every period. Use
:func:`rapido.pipeline.speech.syllables`, whose syllables and gaps have random lengths;
``LagResult.margin`` says how far the best peak stands above the best one at least
``2 * frame`` away (near zero: ambiguous).

Pure numpy, no clock, no I/O: a recording, a WebRTC viewer's decoded frames and the
bench's frame hook all feed :class:`LagMeter` (or :func:`measure_lag`) the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["LagMeter", "LagResult", "measure_lag", "mouth_region"]

#: Resolution of the audio loudness and of the lag grid.
BLOCK_S = 0.001
#: Loudness floor under the stream's loud parts (its 95th percentile block): below this
#: a sound is silence, whatever the noise floor of a codec makes of it.
FLOOR_DB = 40.0


@dataclass(frozen=True)
class LagResult:
    lag_ms: float  # > 0: mouth after sound; < 0: mouth before sound
    corr: float  # Pearson r at the peak
    margin: float  # corr minus the best r at least two frames from the peak
    frames: int  # picture changes that took part
    lags_ms: np.ndarray  # the grid searched
    curve: np.ndarray  # r at each lag of the grid


def mouth_region(boxes: np.ndarray, pad: int, width: int, height: int
                 ) -> tuple[slice, slice]:
    """Rows and columns (of a full-size picture) covering every ``x, y, w, h`` box of
    ``boxes`` (e.g. an avatar's mouth boxes over its idle loop) plus ``pad`` pixels."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    x0 = max(0, int(b[:, 0].min()) - pad)
    y0 = max(0, int(b[:, 1].min()) - pad)
    x1 = min(width, int((b[:, 0] + b[:, 2]).max()) + pad)
    y1 = min(height, int((b[:, 1] + b[:, 3]).max()) + pad)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the boxes lie outside a {width}x{height} picture")
    return slice(y0, y1), slice(x0, x1)


class LagMeter:
    """Collects one stream's pictures (only their mouth region) and its audio, then
    :meth:`result`. Pictures come with their presentation time, audio as blocks placed
    at theirs (gaps are silence); both on one clock, in seconds, any origin.

    Keeps only one number per picture and one per millisecond of audio, so it can watch
    a long stream, or many (the bench)."""

    def __init__(self, rate: int) -> None:
        if rate <= 0 or rate % round(1 / BLOCK_S):
            raise ValueError(f"audio rate {rate} must be a positive multiple of 1000")
        self.rate = rate
        self._per_block = int(rate * BLOCK_S)
        self._pts: list[float] = []
        self._motion: list[float] = []
        self._last: np.ndarray | None = None
        self._audio_t0: float | None = None
        self._energy: list[np.ndarray] = []  # per 1 ms block: mean square, from _audio_t0
        self._blocks = 0
        self._rest = np.zeros(0)  # samples of an unfinished block

    def add_picture(self, pts_s: float, region: np.ndarray) -> None:
        """One decoded picture's mouth region (luma, any numeric dtype), in display
        order. The first picture only becomes the reference for the next."""
        cur = np.asarray(region, dtype=np.float32)
        if self._last is not None and self._last.shape == cur.shape:
            self._pts.append(pts_s)
            self._motion.append(float(np.mean(np.abs(cur - self._last))))
        self._last = cur

    def add_audio(self, pts_s: float, samples: np.ndarray) -> None:
        """Mono samples (int16 or float) that start at ``pts_s``, in time order. A gap
        before them is filled with silence; an overlap is cut from their start."""
        x = np.asarray(samples, dtype=np.float64).reshape(-1)
        if np.issubdtype(np.asarray(samples).dtype, np.integer):
            x = x / 32768.0
        if self._audio_t0 is None:
            self._audio_t0 = pts_s
        at = round((pts_s - self._audio_t0) * self.rate)  # sample index of x[0]
        have = self._blocks * self._per_block + self._rest.size
        if at > have:
            x = np.concatenate([np.zeros(at - have), x])
        elif at < have:
            x = x[have - at:]
        x = np.concatenate([self._rest, x])
        n = x.size // self._per_block
        if n:
            sq = x[: n * self._per_block].reshape(n, self._per_block)
            self._energy.append(np.mean(sq * sq, axis=1))
            self._blocks += n
        self._rest = x[n * self._per_block:]

    def motion(self) -> tuple[np.ndarray, np.ndarray]:
        """The picture changes so far: their times and mouth motion."""
        return np.array(self._pts), np.array(self._motion)

    def loudness(self) -> tuple[float, np.ndarray]:
        """When the first 1 ms block starts, and every block's loudness in dB (floored)."""
        e = np.concatenate(self._energy) if self._energy else np.zeros(0)
        db = 10.0 * np.log10(np.maximum(e, 1e-12))
        if db.size:
            db = np.maximum(db, float(np.percentile(db, 95)) - FLOOR_DB)
        return (self._audio_t0 or 0.0), db

    def result(self, max_lag_ms: float = 300.0) -> LagResult:
        return measure_lag([self], max_lag_ms=max_lag_ms)


def _series(meter: LagMeter, lags_s: np.ndarray, frame_s: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Mouth motion and, per lag, the audio change at the same instants: ``[F]`` and
    ``[lags, F]``. Only pictures whose audio is known at every lag take part."""
    pts, motion = meter.motion()
    t0, db = meter.loudness()
    w = max(1, round(frame_s / BLOCK_S))  # blocks per frame interval
    # Mean loudness over [b, b + w) for every block b, from a cumulative sum.
    c = np.concatenate([[0.0], np.cumsum(db)])
    level = (c[w:] - c[:-w]) / w if db.size >= w else np.zeros(0)
    # Block where the frame interval starting at (pts - lag) begins, and the one before.
    start = np.rint((pts[None, :] - lags_s[:, None] - t0) / BLOCK_S).astype(np.int64)
    prev = start - w
    ok = np.all((prev >= 0) & (start < level.size), axis=0)
    start, prev = start[:, ok], prev[:, ok]
    change = np.abs(level[start] - level[prev]) if ok.any() else np.zeros((lags_s.size, 0))
    return motion[ok], change


def measure_lag(meters: Iterable[LagMeter], *, max_lag_ms: float = 300.0,
                frame_s: float | None = None) -> LagResult:
    """The lag of one stream, or of several pooled (their samples correlated together:
    the bench's streams share one pipeline). ``frame_s`` defaults to the median spacing
    of the pictures."""
    ms = list(meters)
    if frame_s is None:
        gaps = np.concatenate([np.diff(m.motion()[0]) for m in ms] or [np.zeros(0)])
        if gaps.size == 0:
            raise ValueError("need at least three pictures to measure a lag")
        frame_s = float(np.median(gaps))
    lags_ms = np.arange(-round(max_lag_ms), round(max_lag_ms) + 1, dtype=np.float64)
    parts = [_series(m, lags_ms / 1000.0, frame_s) for m in ms]
    motion = np.concatenate([p[0] for p in parts])
    change = np.concatenate([p[1] for p in parts], axis=1)
    if motion.size < 3:
        raise ValueError("too few pictures with audio around them to measure a lag")
    curve = _pearson_rows(change, motion)
    k = int(np.argmax(curve))
    lag = float(lags_ms[k])
    if 0 < k < curve.size - 1:
        # Parabola through the peak and its neighbours (1 ms apart).
        a, b, c = curve[k - 1], curve[k], curve[k + 1]
        den = a - 2 * b + c
        if den < 0:
            lag += float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
    far = np.abs(lags_ms - lags_ms[k]) >= 2000.0 * frame_s
    margin = float(curve[k] - curve[far].max()) if far.any() else float("nan")
    return LagResult(lag, float(curve[k]), margin, int(motion.size), lags_ms, curve)


def _pearson_rows(rows: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pearson r of each row of ``rows`` with ``v`` (0 where either is constant)."""
    rc = rows - rows.mean(axis=1, keepdims=True)
    vc = v - v.mean()
    den = np.sqrt(np.sum(rc * rc, axis=1) * np.sum(vc * vc))
    num = rc @ vc
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
