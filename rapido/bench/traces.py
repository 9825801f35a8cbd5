"""Audio arrival traces with named network/TTS profiles, and a driver that plays them
through an :class:`~rapido.pipeline.jitter.AudioJitterBuffer`.

A *trace* is what a speech source looks like from the receiving end: when each chunk of
audio arrives and how big it is, plus an end-of-utterance marker after each utterance's
last chunk. Every profile is built on the same *nominal* schedule: utterances of
``utterance_s`` every ``utterance_s + pause_s`` seconds, chunk ``i`` of an utterance due
``i * chunk_ms`` after the utterance starts (a real-time source sends each chunk as soon as
it is produced). The profiles then perturb that schedule the way real links do. Traces
are pure data, deterministic per seed, so the same trace can drive a unit test, a
property test and the benchmark.

:func:`play_trace` is a discrete-event simulation of one stream: arrivals are pushed into
the buffer at their arrival times and playout pulls one frame per video tick, with the
tick phase unrelated to the arrivals (as it is in the server, where the clock and the
socket are independent). Nothing sleeps; time is the trace's.

Why one module over 500 lines: the profiles, the transformations of a trace (concatenated,
made unpunctual) and the simulation that plays them share one data shape and one set of
constants that the tests check against; split, each part would import the others'.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from rapido.pipeline.jitter import (
    AudioJitterBuffer,
    JitterEvent,
    JitterStats,
    PlaybackFinished,
    PlaybackStarted,
    Refill,
    Underrun,
)


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float  # arrival time in seconds (monotonic, from 0)
    samples: int  # number of samples in the chunk (at the trace's rate)
    end: bool = False  # an "end of utterance" marker (samples == 0)


PROFILES = ("steady", "moderate", "heavy", "tts_fast", "stalls")

_DESCRIPTIONS = {
    "steady": "every chunk exactly on its real-time schedule: no jitter at all",
    "moderate": "each chunk delayed by |N(0, 15 ms)| clipped at 60 ms, order kept",
    "heavy": "each chunk delayed by |N(0, 35 ms)| clipped at 150 ms, and about one chunk in"
             " 25 starts a burst: 3-7 chunks held back, then all delivered at once",
    "tts_fast": "TTS faster than real time: each utterance delivered at 3-5x real time",
    "stalls": "real time with light jitter, plus a 300-600 ms stall about every 2.5 s of"
              " speech (at least one per utterance); the backlog then arrives in a burst",
}

# Profile parameters (seconds). Kept here so the tests can check against the same numbers.
MODERATE_SIGMA_S = 0.015
MODERATE_CLIP_S = 0.060
HEAVY_SIGMA_S = 0.035
HEAVY_CLIP_S = 0.150
HEAVY_BURST_P = 0.04
HEAVY_BURST_CHUNKS = (3, 7)
HEAVY_BURST_TAIL_S = 0.030  # extra delay of a burst's release after its last chunk is due
TTS_SPEED = (3.0, 5.0)
STALL_S = (0.300, 0.600)
STALL_EVERY_S = 2.5
STALL_SPACING_S = 0.5  # at least this much normal delivery between two stalls
STALL_JITTER_SIGMA_S = 0.003
STALL_JITTER_CLIP_S = 0.010

#: Arrivals closer than this count as "at once" when looking for bursts.
BURST_EPS_S = 0.001
#: A burst is at least this many chunks arriving at once.
BURST_MIN_CHUNKS = 3


def profile_description(profile: str) -> str:
    _check_profile(profile)
    return _DESCRIPTIONS[profile]


def make_trace(
    profile: str,
    *,
    duration_s: float = 10.0,
    rate: int = 48000,
    chunk_ms: float = 20.0,
    utterance_s: float = 4.0,
    pause_s: float = 1.0,
    seed: int = 0,
) -> list[Arrival]:
    """The arrivals of ``duration_s`` of nominal stream time under ``profile``.

    Utterances start every ``utterance_s + pause_s`` seconds while the start is inside
    ``duration_s``; the last one is cut short at ``duration_s``. Each utterance is
    ``round(len * rate)`` samples in chunks of ``round(chunk_ms * rate / 1000)`` (the last
    chunk carries the remainder), followed by an end marker at its last chunk's arrival
    time. ``pause_s`` may be 0 (utterances back to back); every other duration must be
    positive."""
    _check_profile(profile)
    for name, value in (("duration_s", duration_s), ("chunk_ms", chunk_ms),
                        ("utterance_s", utterance_s)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"make_trace: {name} must be a positive number, got {value!r}")
    if not (math.isfinite(pause_s) and pause_s >= 0):
        raise ValueError(f"make_trace: pause_s must be >= 0, got {pause_s!r}")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"make_trace: rate must be a positive int, got {rate!r}")
    chunk = round(chunk_ms * rate / 1000.0)
    if chunk < 1:
        raise ValueError(f"make_trace: chunk_ms={chunk_ms} is less than one sample at {rate} Hz")

    rng = np.random.default_rng(seed)
    trace: list[Arrival] = []
    period = utterance_s + pause_s
    last_t = 0.0
    k = 0
    while (start := k * period) < duration_s:
        total = round(min(utterance_s, duration_s - start) * rate)
        k += 1
        if total <= 0:
            continue
        sizes = [chunk] * (total // chunk)
        if total % chunk:
            sizes.append(total % chunk)
        # Nominal (real-time) due times: each chunk when its first sample is due.
        offsets = np.concatenate(([0], np.cumsum(sizes[:-1]))) / rate
        due = start + offsets
        times = _perturb(profile, due, chunk / rate, rng)
        # Order is kept and time never runs backwards, across utterances too: a chunk
        # cannot overtake the one before it.
        times = np.maximum.accumulate(np.maximum(times, last_t))
        trace.extend(Arrival(float(t), n) for t, n in zip(times, sizes, strict=True))
        last_t = float(times[-1])
        trace.append(Arrival(last_t, 0, end=True))
    return trace


def _perturb(profile: str, due: np.ndarray, chunk_s: float,
             rng: np.random.Generator) -> np.ndarray:
    n = len(due)
    if profile == "steady":
        return due.copy()
    if profile == "moderate":
        return due + np.minimum(np.abs(rng.normal(0.0, MODERATE_SIGMA_S, n)), MODERATE_CLIP_S)
    if profile == "heavy":
        times = due + np.minimum(np.abs(rng.normal(0.0, HEAVY_SIGMA_S, n)), HEAVY_CLIP_S)
        # Bursts: a run of chunks is held back and released together shortly after the
        # run's last chunk is due. The run is short enough that its first chunk is at most
        # ~HEAVY_CLIP_S late (at 20 ms chunks), so "up to ~150 ms" holds for bursts too.
        k_max = max(HEAVY_BURST_CHUNKS[0],
                    min(HEAVY_BURST_CHUNKS[1],
                        int((HEAVY_CLIP_S - HEAVY_BURST_TAIL_S) / chunk_s) + 1))
        i = 0
        while i < n:
            if rng.random() < HEAVY_BURST_P:
                k = int(rng.integers(HEAVY_BURST_CHUNKS[0], k_max + 1))
                j = min(n, i + k) - 1
                release = due[j] + rng.uniform(0.0, HEAVY_BURST_TAIL_S)
                times[i : j + 1] = np.maximum(times[i : j + 1], release)
                i = j + 1
            else:
                i += 1
        return times
    if profile == "tts_fast":
        speed = rng.uniform(*TTS_SPEED)
        start = float(due[0])
        return start + (due - start) / speed
    if profile == "stalls":
        jitter = np.minimum(np.abs(rng.normal(0.0, STALL_JITTER_SIGMA_S, n)),
                            STALL_JITTER_CLIP_S)
        times = due + jitter
        length = due[-1] - due[0] + chunk_s
        stalls = max(1, round(length / STALL_EVERY_S))
        # Stalls start in the middle 70 % of the utterance, so each one is mid-utterance,
        # and are kept apart so that two never merge into one longer than STALL_S.
        clear_at = -math.inf
        for at in np.sort(rng.uniform(due[0] + 0.15 * length, due[0] + 0.85 * length, stalls)):
            stall = rng.uniform(*STALL_S)
            if at < clear_at:
                continue
            clear_at = at + stall + STALL_SPACING_S
            # Nothing arrives during [at, at + stall): whatever fell due in it, and
            # whatever was already late into it, arrives when the stall ends.
            held = (times >= at) & (times < at + stall)
            times[held] = at + stall
        return times
    raise AssertionError(profile)  # _check_profile ran first


def concat_traces(traces: Sequence[list[Arrival]], *, gap_s: float = 1.0) -> list[Arrival]:
    """One trace that plays ``traces`` one after another (e.g. a heavy section, then a
    steady one): each is shifted to start ``gap_s`` after the previous one's last arrival."""
    if not (math.isfinite(gap_s) and gap_s >= 0):
        raise ValueError(f"concat_traces: gap_s must be >= 0, got {gap_s!r}")
    out: list[Arrival] = []
    for trace in traces:
        shift = out[-1].t + gap_s if out else 0.0
        out.extend(dataclasses.replace(a, t=a.t + shift) for a in trace)
    return out


def unpunctual(trace: list[Arrival], late_s: float, seed: int) -> list[Arrival]:
    """``trace`` from a client a few ms off: each arrival (end markers too) up to
    ``late_s`` later, uniformly, order kept (a chunk never overtakes the one before it)."""
    if not (math.isfinite(late_s) and late_s >= 0):
        raise ValueError(f"unpunctual: late_s must be >= 0, got {late_s!r}")
    rng = np.random.default_rng(seed)
    out: list[Arrival] = []
    last = 0.0
    for a in trace:
        last = max(last, a.t + float(rng.uniform(0.0, late_s)))
        out.append(Arrival(last, a.samples, end=a.end))
    return out


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown trace profile {profile!r}; choose one of {', '.join(PROFILES)}")


def trace_stats(trace: list[Arrival], rate: int) -> dict[str, float]:
    """What a trace looks like, per its chunks (end markers only split utterances).

    * ``lateness_*_ms``: lateness of each chunk against the real-time schedule that starts
      at its utterance's first arrival (negative = early). ``lateness_max_ms`` is the
      least pre-buffer that would have played the trace without an underrun.
    * ``jitter_*_ms``: each chunk's delay relative to the least-delayed chunk of its
      utterance (NetEQ's relative arrival delay; >= 0, independent of the first chunk).
      For real-time profiles this is the delay the profile injected.
    * ``max_gap_ms``: the longest wait between consecutive chunks inside an utterance.
    * ``bursts`` / ``max_burst``: runs of >= 3 chunks arriving at once, and the longest.
    * ``speed_min`` / ``speed_mean``: how fast utterances were delivered, vs real time
      (media from the first chunk to the start of the last / arrival span).
    """
    if rate <= 0:
        raise ValueError("trace_stats: rate must be > 0")
    lateness: list[np.ndarray] = []
    jitter: list[np.ndarray] = []
    speeds: list[float] = []
    max_gap = 0.0
    bursts = 0
    max_burst = 1 if any(not a.end for a in trace) else 0
    chunks = 0
    samples = 0
    utterances = 0

    def close(utt: list[Arrival]) -> None:
        nonlocal max_gap, bursts, max_burst
        if not utt:
            return
        t = np.array([a.t for a in utt])
        sizes = np.array([a.samples for a in utt])
        offsets = np.concatenate(([0], np.cumsum(sizes[:-1]))) / rate
        lateness.append(t - (t[0] + offsets))
        rel = t - offsets
        jitter.append(rel - rel.min())
        if len(t) > 1:
            max_gap = max(max_gap, float(np.max(np.diff(t))))
            span = t[-1] - t[0]
            speeds.append(float(offsets[-1] / span) if span > 0 else math.inf)
        run = 1
        for a, b in itertools.pairwise(t):
            run = run + 1 if b - a <= BURST_EPS_S else 1
            if run == BURST_MIN_CHUNKS:
                bursts += 1
            max_burst = max(max_burst, run)

    current: list[Arrival] = []
    for a in trace:
        if a.end:
            close(current)
            utterances += 1
            current = []
        elif a.samples > 0:
            current.append(a)
            chunks += 1
            samples += a.samples
    close(current)  # an unterminated last utterance still counts for timing

    late = np.concatenate(lateness) if lateness else np.zeros(0)
    jit = np.concatenate(jitter) if jitter else np.zeros(0)

    def ms(values: np.ndarray, how: str) -> float:
        if not len(values):
            return 0.0
        if how == "mean":
            return float(1000.0 * values.mean())
        if how == "p95":
            return float(1000.0 * np.quantile(values, 0.95))
        return float(1000.0 * values.max())

    return {
        "chunks": chunks,
        "utterances": utterances,
        "samples": samples,
        "speech_s": samples / rate,
        "span_s": trace[-1].t if trace else 0.0,
        "lateness_mean_ms": ms(late, "mean"),
        "lateness_p95_ms": ms(late, "p95"),
        "lateness_max_ms": ms(late, "max"),
        "jitter_mean_ms": ms(jit, "mean"),
        "jitter_p95_ms": ms(jit, "p95"),
        "jitter_max_ms": ms(jit, "max"),
        "max_gap_ms": 1000.0 * max_gap,
        "bursts": bursts,
        "max_burst": max_burst,
        "speed_min": min(speeds) if speeds else 1.0,
        "speed_mean": float(np.mean(speeds)) if speeds else 1.0,
    }


# -- playing a trace through a jitter buffer ----------------------------------------------


#: Period of the test-signal counter: prime, so it never lines up with chunk or frame sizes.
COUNTER_PERIOD = 32749


def counter_audio(start: int, n: int) -> np.ndarray:
    """Samples ``start .. start + n`` of a running counter: every sample says where it was
    in the stream, so a dropped, repeated or reordered sample shows up in a comparison."""
    return (np.arange(start, start + n, dtype=np.int64) % COUNTER_PERIOD).astype(np.int16)


E = TypeVar("E", bound=PlaybackStarted | PlaybackFinished | Underrun | Refill)


@dataclass(frozen=True, slots=True)
class TimedEvent(Generic[E]):
    t: float  # tick time of the pull that reported it
    frame: int  # index of that pull
    event: E


@dataclass(slots=True)
class PlayResult:
    """Everything one simulated stream did. Per-frame arrays are indexed by tick."""

    fps: int
    rate: int
    frame_samples: int
    frame_t: np.ndarray  # tick time of each pull
    real: np.ndarray  # real (speech) samples in each frame
    concealed: np.ndarray  # concealment samples in each frame
    target_ms: np.ndarray  # the buffer's target after each pull
    buffered_ms: np.ndarray  # the buffer's level after each pull
    events: list[TimedEvent[JitterEvent]]
    stats: JitterStats  # a snapshot taken after the last pull
    played: np.ndarray  # int16: every real sample played out, in order
    pushed: np.ndarray  # int16: every sample pushed, in order
    push_t: list[float] = field(default_factory=list)  # when each push was delivered

    @property
    def underruns(self) -> int:
        return self.stats.underruns

    @property
    def frames(self) -> int:
        return len(self.frame_t)

    def of_type(self, kind: type[E]) -> list[TimedEvent[E]]:
        """The events of one kind, typed as that kind."""
        return [TimedEvent(e.t, e.frame, ev) for e in self.events
                if isinstance(ev := e.event, kind)]

    def first_frame(self, kind: type[JitterEvent]) -> int | None:
        found = self.of_type(kind)
        return found[0].frame if found else None

    def summary(self) -> dict[str, float]:
        s = self.stats
        started = self.of_type(PlaybackStarted)
        return {
            "frames": self.frames,
            "underruns": s.underruns,
            "concealed_ms": 1000.0 * s.concealed_samples / self.rate,
            "emitted_ms": 1000.0 * s.emitted_samples / self.rate,
            "mean_delay_ms": s.mean_delay_ms,
            "target_mean_ms": float(self.target_ms.mean()) if self.frames else 0.0,
            "target_max_ms": float(self.target_ms.max()) if self.frames else 0.0,
            "target_final_ms": float(self.target_ms[-1]) if self.frames else 0.0,
            "buffered_max_ms": float(self.buffered_ms.max()) if self.frames else 0.0,
            "utterances_started": len(started),
        }


def play_trace(
    jb: AudioJitterBuffer,
    trace: list[Arrival],
    *,
    fps: int = 25,
    tail_s: float = 2.0,
    audio: np.ndarray | None = None,
    phase_s: float = 0.013,
    backpressure: bool = False,
) -> PlayResult:
    """Play ``trace`` (made at the buffer's sample rate) through ``jb``.

    Pulls happen at ``phase_s + k / fps``; arrivals at or before a tick are delivered
    before that tick's pull. The default phase (13 ms) is deliberately unrelated to 20 ms
    chunks. Ticking goes on until ``tail_s`` after the last arrival and then until the
    buffer has drained (an utterance that never ends is ended by the buffer's stall
    timeout), so everything pushed is played unless something is lost.

    ``audio`` (1-D int16) is the content pushed, consumed in order and repeated as needed;
    by default a running counter (:func:`counter_audio`). With ``backpressure`` the source
    behaves like the server's reader: while ``jb.has_room`` is False nothing more is
    delivered, and what became due meanwhile arrives right after the pull that made room.
    """
    cfg = jb.config
    if fps <= 0 or cfg.sample_rate % fps or cfg.sample_rate // fps != cfg.frame_samples:
        raise ValueError(
            f"play_trace: fps {fps} does not match the buffer's frame of {cfg.frame_samples}"
            f" samples at {cfg.sample_rate} Hz"
        )
    if not (0.0 <= phase_s < 1.0 / fps):
        raise ValueError(f"play_trace: phase_s must be in [0, {1.0 / fps}), got {phase_s}")
    if not (math.isfinite(tail_s) and tail_s >= 0):
        raise ValueError(f"play_trace: tail_s must be >= 0, got {tail_s}")
    if audio is not None and (audio.dtype != np.int16 or audio.ndim != 1 or not len(audio)):
        raise ValueError("play_trace: audio must be a non-empty 1-D int16 array")
    for a, b in itertools.pairwise(trace):
        if b.t < a.t:
            raise ValueError(f"play_trace: arrival times go backwards ({a.t} -> {b.t})")

    pushed_total = sum(a.samples for a in trace if not a.end)
    if audio is None:
        source = counter_audio(0, pushed_total)
    else:
        source = np.resize(audio, pushed_total)  # repeats audio as needed
    source.flags.writeable = False

    period = 1.0 / fps
    frame_t: list[float] = []
    real: list[int] = []
    concealed: list[int] = []
    target: list[float] = []
    level: list[float] = []
    played: list[np.ndarray] = []
    events: list[TimedEvent[JitterEvent]] = []
    push_t: list[float] = []

    i = 0  # next arrival
    pos = 0  # next source sample
    resume_t = -math.inf  # back-pressure: blocked arrivals are delivered at this time
    last_delivery = 0.0
    # A hard stop, so a buffer that never drains fails a test instead of hanging it.
    limit = (trace[-1].t if trace else 0.0) + tail_s + pushed_total / cfg.sample_rate \
        + 2.0 * cfg.stall_timeout_ms / 1000.0 + 1.0
    k = 0
    while True:
        now = phase_s + k * period
        while i < len(trace):
            a = trace[i]
            at = max(a.t, resume_t)
            if at > now:
                break
            if a.end:
                jb.end_utterance(at)
            elif a.samples > 0:
                if backpressure and not jb.has_room:
                    break  # the source is blocked until a pull makes room
                # Slices of a read-only array: the buffer may keep references, and the
                # comparison at the end proves it never wrote into them either.
                jb.push(source[pos : pos + a.samples], at)
                pos += a.samples
                push_t.append(at)
            last_delivery = at
            i += 1
        pull = jb.pull(now)
        frame_t.append(now)
        real.append(pull.real_samples)
        concealed.append(pull.concealed_samples)
        target.append(jb.target_ms)
        level.append(jb.buffered_ms)
        if pull.real_samples:
            # pull() puts a frame's real samples first (then padding or concealment).
            played.append(pull.audio[: pull.real_samples].copy())
        events.extend(TimedEvent(now, k, ev) for ev in pull.events)
        if backpressure and i < len(trace) and jb.has_room and trace[i].t <= now:
            resume_t = now
        k += 1
        done = i >= len(trace) and now >= last_delivery + tail_s
        if done and jb.pending_utterances == 0 and jb.buffered_samples == 0:
            break
        if now > limit:
            break

    return PlayResult(
        fps=fps,
        rate=cfg.sample_rate,
        frame_samples=cfg.frame_samples,
        frame_t=np.array(frame_t),
        real=np.array(real, dtype=np.int64),
        concealed=np.array(concealed, dtype=np.int64),
        target_ms=np.array(target),
        buffered_ms=np.array(level),
        events=events,
        stats=dataclasses.replace(jb.stats),
        played=np.concatenate(played) if played else np.zeros(0, dtype=np.int16),
        pushed=source[:pos].copy(),
        push_t=push_t,
    )
