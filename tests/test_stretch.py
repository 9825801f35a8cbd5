"""Pitch-period time-stretching (rapido.pipeline.stretch): pitch kept, samples accounted.

Pure signal tests, all at the jitter buffer's 48 kHz; a second or two of audio each.
"""

from __future__ import annotations

import numpy as np
import pytest

from rapido.pipeline.speech import speech_like
from rapido.pipeline.stretch import (
    MAX_LAG_MS,
    MIN_LAG_MS,
    Stretched,
    accelerate,
    expand,
    extend,
    min_block,
    time_stretch,
)

RATE = 48_000
BLOCK = 1920  # time_stretch's default 40 ms block


def tone(hz: float, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * hz * t) * 10_000).astype(np.int16)


def speech(seconds: float = 2.0) -> np.ndarray:
    return speech_like(seconds, rate=RATE, seed=3)


def peak_hz(x: np.ndarray) -> float:
    """The strongest frequency of ``x``, to a fraction of a hertz (zero-padded FFT)."""
    n = 1 << 20
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x)), n))
    return float(np.argmax(spectrum)) * RATE / n


def check_block(seg: np.ndarray, out: Stretched, *, faster: bool) -> None:
    """Outside the one-period cross-fade every output sample is the input's, in order,
    and the length changed by exactly the period reported."""
    p, y = out.period, out.audio
    if p == 0:
        assert np.array_equal(y, seg)
        return
    if faster:
        assert len(y) == len(seg) - p
        assert np.array_equal(y[p:], seg[2 * p :])
        a, b = seg[:p], seg[p : 2 * p]
    else:
        assert len(y) == len(seg) + p
        assert np.array_equal(y[:p], seg[:p]) and np.array_equal(y[2 * p :], seg[p:])
        a, b = seg[p : 2 * p], seg[:p]
    fade = y[:p] if faster else y[p : 2 * p]
    # The fade holds no foreign audio: each sample lies between the two it mixes.
    assert np.all(fade >= np.minimum(a, b) - 1) and np.all(fade <= np.maximum(a, b) + 1)


@pytest.mark.parametrize("factor", [0.9, 1.1])
@pytest.mark.parametrize("kind", ["tone", "speech"])
def test_stretch_by_ten_percent_keeps_pitch_and_counts_every_sample(kind: str,
                                                                   factor: float) -> None:
    x = tone(220.0) if kind == "tone" else speech()
    y, ops = time_stretch(x, RATE, factor)
    removed = sum(op.period for _, op in ops) if factor < 1 else 0
    inserted = sum(op.period for _, op in ops) if factor > 1 else 0
    # Exact accounting: the length changed by what was counted, and no more.
    assert len(y) == len(x) - removed + inserted
    # The stretch happened, to within one block of the factor asked for.
    assert abs(len(y) - factor * len(x)) <= BLOCK
    # Block by block, what is not cross-faded is the source, untouched.
    at = 0
    changed = dict(ops)
    for start in range(0, len(x), BLOCK):
        seg = x[start : start + BLOCK]
        out = changed.get(start, Stretched(seg, 0, 0.0))
        check_block(seg, out, faster=factor < 1)
        assert np.array_equal(y[at : at + len(out.audio)], out.audio)
        at += len(out.audio)
    assert at == len(y)
    # Pitch kept: the spectral peak moved by under 1 %.
    assert peak_hz(y) == pytest.approx(peak_hz(x), rel=0.01)
    # And the joins are seamless: no step bigger than the source's own largest.
    assert np.abs(np.diff(y.astype(np.int32))).max() <= \
        1.1 * np.abs(np.diff(x.astype(np.int32))).max()


@pytest.mark.parametrize("hz", [80.0, 130.0, 250.0, 390.0])
def test_the_period_found_is_the_pitch_period(hz: float) -> None:
    seg = tone(hz, 0.04)
    for op in (accelerate, expand):
        out = op(seg, RATE)
        assert out.correlation > 0.99
        # One period, not a multiple of it (to a sample: the period is not whole).
        assert abs(out.period - RATE / hz) <= 1.0, (op.__name__, out.period)
        check_block(seg, out, faster=op is accelerate)


def test_noise_is_left_alone() -> None:
    """White noise has no period: cutting it would be heard, so nothing is cut."""
    rng = np.random.default_rng(0)
    seg = (rng.normal(0, 3000, BLOCK)).astype(np.int16)
    for op in (accelerate, expand):
        out = op(seg, RATE)
        assert out.period == 0 and out.correlation < 0.9
        assert out.audio is seg


def test_quiet_audio_is_cut_by_the_longest_period_allowed() -> None:
    rng = np.random.default_rng(1)
    seg = rng.normal(0, 20, BLOCK).astype(np.int16)  # about -64 dBFS: a pause in speech
    out = accelerate(seg, RATE)
    assert out.period == round(MAX_LAG_MS * RATE / 1000)
    check_block(seg, out, faster=True)
    limited = expand(seg, RATE, max_period=200)
    assert limited.period == 200
    check_block(seg, limited, faster=False)


def test_max_period_and_short_blocks() -> None:
    seg = tone(100.0, 0.04)  # a 10 ms period
    assert accelerate(seg, RATE, max_period=300).period == 0  # the period does not fit
    # A period shorter than the lowest lag allowed never comes out.
    assert accelerate(seg, RATE, max_period=round(MIN_LAG_MS * RATE / 1000) - 1).period == 0
    short = tone(220.0, 0.04)[: min_block(RATE) - 1]
    assert accelerate(short, RATE).period == 0 and expand(short, RATE).period == 0
    assert min_block(RATE) == 1440  # two longest periods: 30 ms


@pytest.mark.parametrize("kind", ["tone", "speech"])
def test_extend_repeats_the_last_period_and_changes_nothing_before(kind: str) -> None:
    """Lengthening audio that is final already: every 40 ms block followed by a repeat of
    its last period while the output is behind +10 %. The blocks are untouched, the
    repeats are exact copies, and the pitch and the joins survive."""
    x = tone(220.0) if kind == "tone" else speech()
    parts: list[np.ndarray] = []
    produced = inserted = 0
    for start in range(0, len(x), BLOCK):
        seg = x[start : start + BLOCK]
        out = Stretched(seg, 0, 0.0)
        if len(seg) >= min_block(RATE) and produced + len(seg) < 1.1 * (start + len(seg)):
            out = extend(seg, RATE)
        p = out.period
        assert np.array_equal(out.audio[: len(seg)], seg)  # nothing final changed
        assert len(out.audio) == len(seg) + p
        assert np.array_equal(out.audio[len(seg) :], seg[len(seg) - p :])  # a true repeat
        parts.append(out.audio)
        produced += len(out.audio)
        inserted += p
    y = np.concatenate(parts)
    assert len(y) == len(x) + inserted
    assert abs(len(y) - 1.1 * len(x)) <= BLOCK
    assert peak_hz(y) == pytest.approx(peak_hz(x), rel=0.01)
    # A repeat has no cross-fade (what follows it is not known yet): its start steps by
    # the fraction of a sample the whole-sample period misses, a little, never a click.
    assert np.abs(np.diff(y.astype(np.int32))).max() <= \
        1.25 * np.abs(np.diff(x.astype(np.int32))).max()
