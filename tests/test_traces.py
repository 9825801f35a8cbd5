"""The arrival-trace generator: each profile has the statistics it claims, and the shape
(utterances, pauses, end markers) every profile shares."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rapido.bench.traces import (
    HEAVY_CLIP_S,
    MODERATE_CLIP_S,
    PROFILES,
    STALL_S,
    TTS_SPEED,
    Arrival,
    concat_traces,
    make_trace,
    play_trace,
    profile_description,
    trace_stats,
    unpunctual,
)
from rapido.pipeline.jitter import AudioJitterBuffer, JitterConfig

RATE = 48_000


def utterances(trace: list[Arrival]) -> list[list[Arrival]]:
    """The chunks of each utterance (end markers split them)."""
    out: list[list[Arrival]] = [[]]
    for a in trace:
        if a.end:
            out.append([])
        else:
            out[-1].append(a)
    assert out[-1] == [], "every trace ends with an end marker"
    return out[:-1]


# -- shape shared by every profile -------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_shape(profile: str) -> None:
    trace = make_trace(profile, duration_s=10.0, seed=3)
    times = [a.t for a in trace]
    assert times[0] >= 0.0
    assert all(b >= a for a, b in itertools.pairwise(times)), "time runs forward"
    assert all((a.samples == 0) == a.end for a in trace)
    # Utterances at 0 and 5 s, 4 s each; each end marker comes with its last chunk.
    utts = utterances(trace)
    assert len(utts) == 2
    for utt in utts:
        assert sum(a.samples for a in utt) == 4 * RATE
        assert all(a.samples == 960 for a in utt)
    ends = [i for i, a in enumerate(trace) if a.end]
    for i in ends:
        assert trace[i].t == trace[i - 1].t
    stats = trace_stats(trace, RATE)
    assert stats["chunks"] == 400 and stats["utterances"] == 2
    assert stats["speech_s"] == pytest.approx(8.0)


def test_pause_is_silent_and_last_utterance_is_cut_at_duration() -> None:
    trace = make_trace("steady", duration_s=7.0, utterance_s=4.0, pause_s=1.0,
                       chunk_ms=30.0)
    first, second = utterances(trace)
    assert sum(a.samples for a in first) == 4 * RATE
    assert sum(a.samples for a in second) == 2 * RATE  # 5 s .. 7 s
    # 4 s is not a multiple of 30 ms: the last chunk carries the remainder.
    assert first[-1].samples == (4 * RATE) % 1440
    # Nothing arrives in the pause: the next chunk is due when the next utterance starts.
    assert second[0].t == pytest.approx(5.0)
    assert first[-1].t < 4.0


def test_pause_zero_means_back_to_back() -> None:
    trace = make_trace("steady", duration_s=3.0, utterance_s=1.0, pause_s=0.0)
    utts = utterances(trace)
    assert len(utts) == 3
    assert utts[1][0].t == pytest.approx(1.0)


# -- each profile's statistics --------------------------------------------------------------


def long_stats(profile: str, seed: int = 0) -> dict[str, float]:
    return trace_stats(make_trace(profile, duration_s=60.0, seed=seed), RATE)


def test_steady_is_exactly_real_time() -> None:
    s = long_stats("steady")
    # (to float precision: due times are offsets of an utterance's start)
    assert s["lateness_max_ms"] == pytest.approx(0.0, abs=1e-6)
    assert s["lateness_mean_ms"] == pytest.approx(0.0, abs=1e-6)
    assert s["jitter_max_ms"] == pytest.approx(0.0, abs=1e-6)
    assert s["max_gap_ms"] == pytest.approx(20.0)
    assert s["bursts"] == 0 and s["max_burst"] == 1
    assert s["speed_min"] == pytest.approx(1.0) and s["speed_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moderate_jitter(seed: int) -> None:
    s = long_stats("moderate", seed)
    # |N(0, 15 ms)| has its 95th percentile at 29.4 ms; clipped at 60 ms.
    assert 20.0 <= s["jitter_p95_ms"] <= 40.0
    assert s["jitter_max_ms"] <= 1000.0 * MODERATE_CLIP_S + 1e-6
    assert 0.0 < s["lateness_p95_ms"] <= 1000.0 * MODERATE_CLIP_S
    assert s["speed_mean"] == pytest.approx(1.0, abs=0.02)  # real time on average
    assert s["max_burst"] <= 4  # order is kept, so a late chunk can hold back a few


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heavy_jitter_is_worse_than_moderate_and_bursty(seed: int) -> None:
    s, m = long_stats("heavy", seed), long_stats("moderate", seed)
    assert s["jitter_p95_ms"] > m["jitter_p95_ms"] + 30.0
    assert s["lateness_p95_ms"] > m["lateness_p95_ms"] + 20.0
    assert s["max_gap_ms"] > m["max_gap_ms"] + 50.0
    assert s["jitter_max_ms"] <= 1000.0 * HEAVY_CLIP_S + 30.0  # "up to ~150 ms"
    assert s["max_burst"] >= 5 and s["bursts"] >= 3 * m["bursts"] + 10
    assert s["speed_mean"] == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tts_fast_is_faster_than_real_time(seed: int) -> None:
    trace = make_trace("tts_fast", duration_s=60.0, seed=seed)
    s = trace_stats(trace, RATE)
    assert TTS_SPEED[0] - 1e-9 <= s["speed_min"] <= s["speed_mean"] <= TTS_SPEED[1] + 1e-9
    assert s["lateness_max_ms"] == 0.0  # nothing is ever behind real time
    assert s["lateness_mean_ms"] < -500.0  # it is well ahead
    # Each 4 s utterance is delivered within 4 / 3 s.
    for utt in utterances(trace):
        assert utt[-1].t - utt[0].t <= 4.0 / TTS_SPEED[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stalls(seed: int) -> None:
    trace = make_trace("stalls", duration_s=60.0, seed=seed)
    s = trace_stats(trace, RATE)
    assert s["max_gap_ms"] >= 1000.0 * STALL_S[0]
    assert s["max_gap_ms"] <= 1000.0 * STALL_S[1] + 30.0  # stalls never merge
    assert s["lateness_max_ms"] >= 1000.0 * STALL_S[0]
    assert s["max_burst"] >= 10  # the backlog arrives at once
    # Every utterance has at least one stall, and it is mid-utterance.
    for utt in utterances(trace):
        t = np.array([a.t for a in utt])
        gaps = np.diff(t)
        worst = int(np.argmax(gaps))
        assert gaps[worst] >= STALL_S[0]
        assert 0 < worst < len(utt) - 2


@pytest.mark.parametrize("profile", PROFILES)
def test_deterministic_per_seed(profile: str) -> None:
    assert make_trace(profile, seed=7) == make_trace(profile, seed=7)
    if profile != "steady":
        assert make_trace(profile, seed=7) != make_trace(profile, seed=8)


@pytest.mark.parametrize("profile", PROFILES)
def test_descriptions(profile: str) -> None:
    assert len(profile_description(profile)) > 20


def test_stats_of_empty_and_unterminated_traces() -> None:
    empty = trace_stats([], RATE)
    assert empty["chunks"] == 0 and empty["lateness_max_ms"] == 0.0
    open_ended = [Arrival(0.0, 960), Arrival(0.5, 960)]
    s = trace_stats(open_ended, RATE)
    assert s["chunks"] == 2 and s["utterances"] == 0
    assert s["max_gap_ms"] == pytest.approx(500.0)
    assert s["lateness_max_ms"] == pytest.approx(480.0)


def test_concat_traces() -> None:
    a = make_trace("steady", duration_s=2.0, utterance_s=1.0)
    b = make_trace("moderate", duration_s=2.0, utterance_s=1.0, seed=1)
    both = concat_traces([a, b], gap_s=0.5)
    assert len(both) == len(a) + len(b)
    assert both[len(a)].t == pytest.approx(a[-1].t + 0.5 + b[0].t)
    assert [x.samples for x in both] == [x.samples for x in a + b]
    with pytest.raises(ValueError):
        concat_traces([a], gap_s=-1.0)


# -- bad arguments --------------------------------------------------------------------------


def test_unknown_profile_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as err:
        make_trace("bursty")
    for name in PROFILES:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        profile_description("nope")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"duration_s": 0.0},
        {"duration_s": -1.0},
        {"duration_s": math.nan},
        {"duration_s": math.inf},
        {"utterance_s": 0.0},
        {"utterance_s": -4.0},
        {"chunk_ms": 0.0},
        {"chunk_ms": -20.0},
        {"chunk_ms": 0.001},  # less than a sample
        {"pause_s": -0.5},
        {"rate": 0},
        {"rate": -48000},
    ],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_trace("steady", **kwargs)  # type: ignore[arg-type]


def test_play_trace_rejects_mismatched_arguments() -> None:
    trace = make_trace("steady", duration_s=1.0)
    jb = AudioJitterBuffer()
    with pytest.raises(ValueError):
        play_trace(jb, trace, fps=30)  # 1600-sample ticks against 1920-sample frames
    with pytest.raises(ValueError):
        play_trace(jb, trace, phase_s=0.05)
    with pytest.raises(ValueError):
        play_trace(jb, trace, audio=np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError):
        play_trace(jb, [Arrival(1.0, 960), Arrival(0.5, 960)])
    # A buffer with 30 fps frames works at 30 fps.
    r = play_trace(AudioJitterBuffer(JitterConfig(frame_samples=1600)), trace, fps=30,
                   phase_s=0.01)
    assert np.array_equal(r.played, r.pushed)


def test_unpunctual_delays_each_arrival_within_its_bound_and_keeps_the_order() -> None:
    trace = make_trace("moderate", duration_s=5.0, seed=2)
    late = unpunctual(trace, 0.005, seed=7)
    assert [(a.samples, a.end) for a in late] == [(a.samples, a.end) for a in trace]
    shifts = [b.t - a.t for a, b in zip(trace, late, strict=True)]
    assert min(shifts) >= 0.0 and max(shifts) <= 0.005 + 1e-12  # order kept costs no more
    assert all(b.t >= a.t for a, b in itertools.pairwise(late))
    assert unpunctual(trace, 0.005, seed=7) == late  # seeded: the same every time
    assert unpunctual(trace, 0.0, seed=7) == trace


@pytest.mark.parametrize("late_s", [-0.001, float("nan"), float("inf")])
def test_unpunctual_refuses_a_bad_bound(late_s: float) -> None:
    with pytest.raises(ValueError, match="late_s"):
        unpunctual(make_trace("steady", duration_s=1.0), late_s, seed=0)
