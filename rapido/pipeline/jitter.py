"""AudioJitterBuffer: smooths bursty speech arrival into a steady 40 ms-per-frame playout.

Pure and synchronous: time comes in as an argument, nothing here sleeps, reads a clock or
touches a socket, so it is tested by feeding arrival traces and looking at the state.

Shape of the logic (after WebRTC's NetEQ):

* Every pushed chunk gives a *relative arrival delay*: (arrival - media time) minus its
  minimum over the last ``window_s``. Those delays go into a histogram that forgets
  (half-life measured in media time), and the *target level* is a high quantile of it plus
  two frames of headroom, clamped to ``[min_target_ms, max_ms]``. The histogram learns
  fast at first, as NetEQ's does after a reset (the first arrival replaces its seed), and
  the initial target is a floor until a second of media has been measured: a session's
  first utterance starts conservatively, the ones after it on what the link has shown.
* An utterance starts playing once ``start_ratio * target`` is buffered (96 ms at the
  initial 160 ms target), or as soon as its end is known. After a delay spike, the
  utterances that begin within ``_PEAK_WINDOW_S`` wait until the spike would be covered
  (its relative delay + ``_PEAK_MARGIN_MS``, up to the target): on bursty links most
  underruns came in an utterance's first half second, from a start level below the
  link's recent spikes (``heavy`` traces: 88 -> 21 in 30 minutes, BENCHMARKS.md). With
  ``stretch`` on, the playing utterance's level is held there too (preemptive expand
  below it, see below). Once a second has been measured, the start also waits for a
  frame plus ``_TAIL_FACTOR`` times the learned delay quantile (the tail past it, which
  ran moderate jitter dry early in an utterance; near 0 on a calm link).
* Playout needing audio mid-utterance with none buffered is an *underrun*: the frame is
  concealed with silence, one concealment event is counted, and playout resumes once
  ``resume_ms`` is buffered again. The silence between utterances is not an underrun.
* With ``stretch`` on, playout shortens or lengthens speech by whole pitch periods
  (:mod:`rapido.pipeline.stretch`, NetEQ's accelerate / preemptive expand) to steer the
  level: see *Time-stretching* below.
* Nothing is ever dropped. ``max_ms`` is where the *caller* stops reading its source
  (back-pressure, see :attr:`has_room`); the buffer itself accepts every push. Only
  :meth:`flush` (barge-in) discards audio, and it reports how much.

Time-stretching (``stretch``, on by default). Once per frame, before taking it, the
playout looks at the level of the playing utterance (what is left to play, stretched as it
will be heard) and decides one thing for the next block of speech it commits:

* *accelerate* (remove one pitch period) when the level is above the target by
  ``_ACCEL_MARGIN_MS`` and the source is not simply ahead of real time: a source held by
  back-pressure (TTS faster than real time) keeps the buffer full whatever playout does,
  and draining it would only speed the voice up. Nor while the target sits at
  ``max_ms``: the estimator is saturated (stalls longer than any target), the level above
  it is what rides out the next stall, and draining it only added underruns (54 -> 60 in
  four minutes of the ``stalls`` profile, in the trace simulation);
* *preemptive expand* (insert one) when the level has fallen below ``_EXPAND_FRAC`` of the
  target (60 %: the level an utterance starts at, so a level that has only sagged from
  its start is lifted back) or below the spike level of the last ``_PEAK_WINDOW_S`` (as
  NetEQ's peak detector lifts its target to the peaks it saw: ``heavy`` traces, six
  10-minute sessions, 21 underruns after the first utterance -> 2, for ~19 ms more
  delay), or when less than the latest chunk would be left after the
  frame: an underrun is near, and a slower voice is better than a gap. Relative to the
  target, not the start level, so a lower ``start_ms`` is made up for by stretching
  (in the trace simulation, ``heavy`` at a 104 ms start: 31 underruns in six minutes
  without, 13 with; at 128 ms: 5 without, 2 with);
* otherwise nothing. Never once the utterance's end has arrived (everything is here: no
  underrun to fear, no latency to win back), and a block never spans two utterances.

Rates are bounded twice: a token bucket fills at ``stretch_rate_pct`` of speech played and
holds at most ``_BUCKET_MS``, and after a change of ``P`` samples the next waits until
``P * (100 / stretch_burst_pct - 1)`` more have played, so no stretch of the short term
exceeds ``stretch_burst_pct``; one change per frame at most. Audio is *committed* (stretched or
passed as it is) before anyone reads it, the frame or the model's look-ahead
(:meth:`peek`), so the lip-sync features see exactly the audio that will be played. A
decision applies where committed audio ends: to the next block of source (30 ms at
least), or, to expand when the look-ahead has committed all there is (the level is low:
just when expanding matters), as a repeat of the last committed period, appended.
Positions (``PlaybackFinished``, ``Underrun``, :attr:`position_ms`) stay in *source*
samples; the level, ``emitted_samples`` and back-pressure count samples as played. Counted
like WebRTC: ``removed_samples_for_acceleration``, ``inserted_samples_for_deceleration``.

One module, about 700 lines, on purpose: it is one pure state machine
(:class:`AudioJitterBuffer`) plus the event and stats types it returns; splitting those
apart would only scatter its interface. The signal processing of stretching lives in
:mod:`rapido.pipeline.stretch`; when and how much stays here, with the state it reads.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from rapido.pipeline.arrival import ForgettingQuantile, WindowMax, WindowMin
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.stretch import (
    MIN_LAG_MS,
    Stretched,
    accelerate,
    expand,
    extend,
    min_block,
)


@dataclass(frozen=True, slots=True)
class JitterConfig:
    sample_rate: int = AUDIO_RATE
    frame_samples: int = AUDIO_RATE // 25
    target_ms: float = 160.0  # initial target, before any arrival has been measured
    min_target_ms: float = 80.0
    # Start level at the initial target; scales with the target. With stretching on, 96 ms
    # starts speech 35-45 ms sooner than 128 (the level a buffer without stretching needs),
    # with no more underruns (BENCHMARKS.md, "Onset: a lower start level").
    start_ms: float = 96.0
    resume_ms: float = 40.0
    max_ms: float = 240.0
    refill_pct: float = 30.0
    quantile: float = 0.95
    window_s: float = 2.0
    half_life_s: float = 1.5  # of media time: the histogram forgets at the rate speech arrives
    stall_timeout_ms: float = 3000.0  # an open utterance with no audio this long ends
    stretch: bool = True  # steer the level by time-stretching (see the module docstring)
    stretch_rate_pct: float = 5.0  # sustained bound: stretch per speech played, in %
    stretch_burst_pct: float = 25.0  # short-term bound, in %

    def __post_init__(self) -> None:
        checks = [
            (self.sample_rate > 0, "sample_rate must be > 0"),
            (self.frame_samples > 0, "frame_samples must be > 0"),
            (0 < self.min_target_ms <= self.target_ms <= self.max_ms,
             "need 0 < min_target_ms <= target_ms <= max_ms"),
            (0 < self.start_ms <= self.target_ms, "need 0 < start_ms <= target_ms"),
            (0 < self.resume_ms <= self.max_ms, "need 0 < resume_ms <= max_ms"),
            (0 < self.refill_pct < 100, "refill_pct must be in (0, 100)"),
            (0.5 <= self.quantile < 1.0, "quantile must be in [0.5, 1)"),
            (self.window_s > 0 and self.half_life_s > 0, "window_s and half_life_s must be > 0"),
            (self.stall_timeout_ms > 0, "stall_timeout_ms must be > 0"),
            (0 < self.stretch_rate_pct <= self.stretch_burst_pct <= 50,
             "need 0 < stretch_rate_pct <= stretch_burst_pct <= 50"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"jitter buffer: {message}")

    @property
    def frame_ms(self) -> float:
        return 1000.0 * self.frame_samples / self.sample_rate


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaybackStarted:
    utterance: int


@dataclass(frozen=True, slots=True)
class PlaybackFinished:
    utterance: int
    position_ms: float  # speech of this utterance actually played
    interrupted: bool
    reason: str  # "end" | "interrupt" | "stalled"


@dataclass(frozen=True, slots=True)
class Underrun:
    utterance: int
    position_ms: float


@dataclass(frozen=True, slots=True)
class Refill:
    buffered_ms: float
    target_ms: float


JitterEvent = PlaybackStarted | PlaybackFinished | Underrun | Refill


@dataclass(slots=True)
class PullResult:
    audio: np.ndarray  # int16, exactly frame_samples long
    real_samples: int  # samples of speech in this frame (the rest is padding/concealment)
    concealed_samples: int
    utterance: int | None  # utterance whose speech this frame carries, if any
    events: list[JitterEvent]
    # Source samples the frame's speech stands for: ``real_samples`` unless stretched.
    source_samples: int = 0

    @property
    def speaking(self) -> bool:
        return self.real_samples > 0


@dataclass(slots=True)
class JitterStats:
    """Counters named after W3C webrtc-stats' inbound-rtp jitter buffer fields."""

    emitted_samples: int = 0  # speech samples played out (jitterBufferEmittedCount)
    concealed_samples: int = 0
    concealment_events: int = 0  # == underruns
    padded_samples: int = 0  # silence appended after an utterance's last partial frame
    delay_sample_seconds: float = 0.0  # sum over emitted samples of time spent buffered
    received_samples: int = 0
    flushed_samples: int = 0  # discarded by interrupts, and only by them
    utterances_started: int = 0
    utterances_finished: int = 0
    # Time-stretching, as WebRTC counts it: a played sample is a received one, minus
    # those removed, plus those inserted (emitted + flushed + buffered == received
    # - removed + inserted).
    removed_samples_for_acceleration: int = 0
    inserted_samples_for_deceleration: int = 0

    @property
    def underruns(self) -> int:
        return self.concealment_events

    @property
    def mean_delay_ms(self) -> float:
        if not self.emitted_samples:
            return 0.0
        return 1000.0 * self.delay_sample_seconds / self.emitted_samples


# -- internals -----------------------------------------------------------------------


@dataclass(slots=True)
class _Chunk:
    samples: np.ndarray
    arrival: float
    offset: int = 0
    # Source samples these samples stand for (== len(samples) unless stretched); -1: same.
    src: int = -1

    @property
    def remaining(self) -> int:
        return len(self.samples) - self.offset


@dataclass(slots=True)
class _Utterance:
    id: int
    chunks: deque[_Chunk] = field(default_factory=deque)  # source, not yet committed
    # Committed audio, before ``chunks``: stretched (or passed as it is) and perhaps
    # already read by the look-ahead, so never changed again.
    ready: deque[_Chunk] = field(default_factory=deque)
    ready_len: int = 0
    buffered: int = 0  # left to play, as it will be played (ready + chunks)
    ended: bool = False
    first_arrival: float = 0.0
    last_arrival: float = 0.0
    played: int = 0  # source samples played (positions are in source samples)
    received: int = 0  # source samples pushed
    started: bool = False
    stalled: bool = False  # ended by the stall timeout, not by its source


# Time-stretch policy (see the module docstring).
_ACCEL_MARGIN_MS = 20.0  # accelerate above target + this (NetEQ's high limit is 20 ms up)
# Expand below this share of the target. At 0.5 the level settled at the start level (60 %
# of the target) with nothing to lift it, and a 16 kHz stream sits 1 ms under every chunk
# boundary (the resampler's group delay withholds 48 samples until the utterance ends), so
# two late chunks ran moderate jitter dry by 1 ms: 43 underruns in 50 stream-minutes of the
# trace simulation with that 1 ms, 2 at 0.6, for 6 ms more delay (BENCHMARKS.md).
_EXPAND_FRAC = 0.6
# Expand, too, when less than the latest chunk (up to _TROUGH_MAX_MS) would be left after
# the frame: with 20 ms chunks and 40 ms frames a level that starts at 51 ms dips to 19
# after each frame (1 ms under a chunk, the resampler's delay), so a chunk landing just
# after the tick left the next frame 1 ms short. A client a few ms unpunctual on a calm
# link: 22 underruns in 50 stream-minutes of the trace simulation, 6 with this, for
# 7 ms more delay (BENCHMARKS.md).
_TROUGH_MAX_MS = 40.0
_AHEAD_FRAC = 0.5  # a source this share of max_ms ahead of real time is faster than it
_BUCKET_MS = 60.0  # at burst rate 25 % and 5 % sustained: bursts of about 300 ms

# The start level covers the largest relative delay of the last _PEAK_WINDOW_S plus this
# margin (up to the target): on a link whose delays spike well above its usual, starting
# at a share of the target ran dry within the first half second of most utterances.
_PEAK_WINDOW_S = 5.0
_PEAK_MARGIN_MS = 20.0
_HIST_BIN_MS = 5.0
_HIST_BINS = 200  # 0 .. 1 s of relative delay; anything later lands in the last bin
# The delay histogram learns like NetEQ's after a reset (start_forget_weight 2, as in its
# delay manager): from the first arrival it holds measured delays only, weighted about
# evenly at first. Until _LEARN_S of media has been measured the initial target stays a
# floor: the first utterance of a session starts on the conservative level, but the
# next ones on what the link has shown (before, a seed in the histogram held the target
# there for ~6.5 s of speech; steady onset p95 in the trace simulation 93 -> 53 ms).
_START_FORGET_WEIGHT = 2.0
_LEARN_S = 1.0
# An utterance's start waits, too, until a frame plus this many times the learned delay
# quantile is buffered. The quantile (95 %) is what one chunk in twenty exceeds; an
# utterance rides on the few chunks that made its start level, and the level stays about
# where it started. Started at 60 % of the target (the quantile + two frames), when those
# chunks came early and the next ones late it ran dry, mostly within 80-360 ms of the
# start: on moderate jitter from a client up to 5 ms late, 14 underruns in 400
# stream-minutes of the trace simulation (scripts/jitter_sim.py); 10 at 1.25x, none at
# 1.5x (about the 99.7th percentile of a Gaussian link's delays), for ~20 ms more onset
# there. On a steady link the quantile is near 0 and the start is unchanged
# (BENCHMARKS.md).
_TAIL_FACTOR = 1.5
# Where a link's tail is bursts (heavy), the spike level above already covers what the
# last bursts showed: the tail up to the whole target started heavy jitter's utterances
# 48 ms later (onset p95, live, 16 streams) for no fewer underruns; at 80 % of it,
# heavy plays as without (the same underruns and onsets over 100 simulated minutes),
# moderate as with the whole target.
_TAIL_MAX_FRAC = 0.8


class AudioJitterBuffer:
    """One stream's buffer. ``push``/``end_utterance`` on arrival, ``pull`` once per frame."""

    IDLE = "idle"
    BUFFERING = "buffering"
    PLAYING = "playing"
    UNDERRUN = "underrun"

    def __init__(self, config: JitterConfig | None = None) -> None:
        self.config = cfg = config or JitterConfig()
        self.stats = JitterStats()
        self._rate = cfg.sample_rate
        self._fs = cfg.frame_samples
        self._silence = np.zeros(self._fs, dtype=np.int16)
        self._silence.flags.writeable = False
        # Utterances in arrival order; the head is the one playing (or about to).
        self._utts: deque[_Utterance] = deque()
        self._open: _Utterance | None = None  # input side: receiving audio, no end yet
        self._next_id = 1
        self._state = self.IDLE
        self._concealed_run = 0  # samples concealed in the current underrun
        self._refill_armed = True
        self._buffered = 0
        # Arrival-delay estimation, per input-side utterance.
        self._media_s = 0.0
        self._window = WindowMin(cfg.window_s)
        self._peaks = WindowMax(_PEAK_WINDOW_S)  # relative delays, across utterances
        self._last_arrival = 0.0
        # The target is cfg.target_ms until arrivals move it, and no lower until
        # _LEARN_S of media has been measured.
        self._delays = ForgettingQuantile(
            _HIST_BINS, _HIST_BIN_MS, cfg.quantile,
            seed=max(0.0, cfg.target_ms - self._headroom_ms()),
            start_weight=_START_FORGET_WEIGHT)
        self._learned_s = 0.0
        self._target_ms = cfg.target_ms
        # Time-stretching: this frame's decision, the token bucket (samples) and the
        # spacing since the last change (samples played, and samples still to wait).
        self._op: str | None = None
        self._bucket = 0.0
        self._chunk_ms = 0.0  # the latest push's duration
        self._bucket_max = self._ms_to_samples(_BUCKET_MS)
        self._since_op = 0
        self._op_gap = 0
        self._min_block = min_block(self._rate)
        self._min_period = round(MIN_LAG_MS * self._rate / 1000.0)

    # -- input side ---------------------------------------------------------------

    def start_utterance(self, now: float) -> int:
        """Begin a new utterance explicitly (an open one is ended first). Returns its id."""
        if self._open is not None:
            self.end_utterance(now)
        return self._open_utterance(now).id

    def push(self, samples: np.ndarray, now: float) -> None:
        """Queue speech. Never drops: back-pressure is the caller's job (:attr:`has_room`)."""
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise ValueError("push() takes a 1-D int16 array of mono samples")
        n = len(samples)
        if n == 0:
            return
        utt = self._open if self._open is not None else self._open_utterance(now)
        self._measure_arrival(n, now)
        self._chunk_ms = 1000.0 * n / self._rate
        utt.chunks.append(_Chunk(samples, now))
        utt.buffered += n
        utt.received += n
        utt.last_arrival = now
        self._buffered += n
        self.stats.received_samples += n

    def end_utterance(self, now: float) -> int | None:
        """Mark the end of the utterance being received; returns its id (None if none open)."""
        utt = self._open
        if utt is None:
            return None
        utt.ended = True
        utt.last_arrival = now
        self._open = None
        if utt.buffered == 0 and not utt.started and utt is self._utts[-1]:
            # An utterance with no audio at all has nothing to play: forget it.
            self._utts.pop()
        return utt.id

    # -- output side --------------------------------------------------------------

    def pull(self, now: float) -> PullResult:
        """Audio for the next video frame. Always exactly ``frame_samples`` long."""
        events: list[JitterEvent] = []
        utt = self._utts[0] if self._utts else None
        if utt is None:
            self._state = self.IDLE
            return PullResult(self._silence, 0, 0, None, events)

        if self._state in (self.IDLE, self.BUFFERING):
            if not self._ready_to_start(utt, now):
                self._state = self.BUFFERING
                return PullResult(self._silence, 0, 0, None, events)
            self._state = self.PLAYING
            utt.started = True
            self.stats.utterances_started += 1
            self._refill_armed = True
            events.append(PlaybackStarted(utt.id))
        elif self._state == self.UNDERRUN:
            if utt.ended and utt.buffered == 0:
                # Its source ended (or stalled) during the underrun with nothing more to
                # play: finish here, without a frame of "padding" that held no speech.
                self._finish(utt, events, interrupted=False, reason=self._end_reason(utt))
                return PullResult(self._silence, 0, 0, utt.id, events)
            # At least a whole frame: resuming on less would underrun again at once and
            # count one stall as several underruns.
            resume = max(self._fs, self._ms_to_samples(self.config.resume_ms))
            if utt.buffered >= resume or utt.ended:
                self._state = self.PLAYING
                self._concealed_run = 0
            else:
                return self._conceal(utt, now, events)

        # PLAYING
        played_before = utt.played
        if self.config.stretch:
            # Decide, and commit the frame, before the level is judged: an expanded
            # block can be what saves this frame from an underrun.
            self._decide(utt)
            self._commit(utt, self._fs)
        if utt.buffered < self._fs and not utt.ended:
            if utt.buffered == 0:
                self._state = self.UNDERRUN
                self.stats.concealment_events += 1
                events.append(Underrun(utt.id, self._position_ms(utt)))
                return self._conceal(utt, now, events)
            # Play what there is, conceal the rest of the frame: an underrun starts here.
            out = np.empty(self._fs, dtype=np.int16)
            got = self._take(utt, out, now)
            out[got:] = 0
            self._state = self.UNDERRUN
            self.stats.concealment_events += 1
            self.stats.concealed_samples += self._fs - got
            self._concealed_run = self._fs - got
            events.append(Underrun(utt.id, self._position_ms(utt)))
            return PullResult(out, got, self._fs - got, utt.id, events,
                              utt.played - played_before)

        out = np.empty(self._fs, dtype=np.int16)
        got = self._take(utt, out, now)
        if got < self._fs:  # the utterance's last, partial frame
            out[got:] = 0
            self.stats.padded_samples += self._fs - got
        if utt.ended and utt.buffered == 0:
            self._finish(utt, events, interrupted=False, reason=self._end_reason(utt))
        else:
            self._check_refill(events)
        return PullResult(out, got, 0, utt.id, events, utt.played - played_before)

    def flush(self, now: float) -> list[JitterEvent]:
        """Barge-in: discard every buffered sample of every utterance, at once.

        Returns a ``PlaybackFinished(interrupted=True)`` for the utterance that was playing
        or buffering, carrying the position where its playback stopped."""
        events: list[JitterEvent] = []
        for i, utt in enumerate(self._utts):
            self.stats.flushed_samples += utt.buffered
            if i == 0 and (utt.started or utt.buffered or not utt.ended):
                events.append(
                    PlaybackFinished(utt.id, self._position_ms(utt), True, "interrupt")
                )
        if self._utts and self._utts[0].started:
            self.stats.utterances_finished += 1
        self._utts.clear()
        self._open = None
        self._buffered = 0
        self._state = self.IDLE
        self._concealed_run = 0
        self._window.clear()
        self._op = None
        return events

    # -- state --------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    @property
    def buffered_ms(self) -> float:
        return 1000.0 * self._buffered / self._rate

    @property
    def has_room(self) -> bool:
        """False once ``max_ms`` is buffered: the caller should stop reading its source."""
        return self._buffered < self._ms_to_samples(self.config.max_ms)

    @property
    def target_ms(self) -> float:
        return self._target_ms

    @property
    def start_level_ms(self) -> float:
        """What an utterance must have buffered before it starts (as of the last arrival):
        ``start_ms`` scaled with the target, or, when the link's delays have spiked in
        the last few seconds, enough to cover the largest spike (``_PEAK_MARGIN_MS`` on
        top), never above the target; a spike no target could ride out (past
        ``max_ms``, a stall) is not waited for."""
        return self._start_level_ms(self._last_arrival)

    def _spike_level_ms(self, now: float) -> float:
        """The level that rides out the largest relative delay of the last
        ``_PEAK_WINDOW_S`` (+ ``_PEAK_MARGIN_MS``), never above the target; 0 when there
        was none, or when it was past ``max_ms`` (a stall no level could ride out)."""
        peak = self._peaks.value(now)
        if peak is None or peak + _PEAK_MARGIN_MS > self.config.max_ms:
            return 0.0
        return min(self._target_ms, peak + _PEAK_MARGIN_MS)

    def _start_level_ms(self, now: float) -> float:
        cfg = self.config
        level = self._target_ms * cfg.start_ms / cfg.target_ms
        return max(level, self._spike_level_ms(now), self._tail_level_ms())

    def _tail_level_ms(self) -> float:
        """A frame plus ``_TAIL_FACTOR`` times the learned delay quantile, up to
        ``_TAIL_MAX_FRAC`` of the target: 0 while the target is still the initial floor,
        or saturated at ``max_ms`` (stalls, which no start level rides out)."""
        if self._learned_s < _LEARN_S or self._target_ms >= self.config.max_ms:
            return 0.0
        quantile_ms = self._target_ms - self._headroom_ms()
        return min(_TAIL_MAX_FRAC * self._target_ms,
                   self.config.frame_ms + _TAIL_FACTOR * quantile_ms)

    @property
    def current_utterance(self) -> int | None:
        if self._utts and self._utts[0].started:
            return self._utts[0].id
        return None

    @property
    def receiving(self) -> bool:
        """An utterance is open on the input side (audio came, no end yet)."""
        return self._open is not None

    @property
    def pending_utterances(self) -> int:
        return len(self._utts)

    @property
    def position_ms(self) -> float:
        """Playback position inside the current utterance."""
        return self._position_ms(self._utts[0]) if self._utts else 0.0

    def peek(self, n: int) -> np.ndarray:
        """The next ``n`` buffered samples of the head utterance without consuming them
        (the model's look-ahead window); shorter if fewer are buffered."""
        if not self._utts or n <= 0:
            return self._silence[:0]
        head = self._utts[0]
        if self.config.stretch:
            self._commit(head, n)  # what the look-ahead reads is never changed after
        parts: list[np.ndarray] = []
        need = n
        for chunk in itertools.chain(head.ready, head.chunks):
            part = chunk.samples[chunk.offset : chunk.offset + need]
            parts.append(part)
            need -= len(part)
            if need <= 0:
                break
        return np.concatenate(parts) if parts else self._silence[:0]

    def lookahead(self, utterance: int, n: int) -> tuple[np.ndarray, bool]:
        """Up to ``n`` samples that follow what ``utterance`` has played so far, and
        whether they are all it will ever have (its end has arrived and is within
        them). An utterance that has finished playing has nothing more: ``(empty, True)``."""
        if not self._utts or self._utts[0].id != utterance:
            return self._silence[:0], True
        head = self._utts[0]
        ahead = self.peek(n)
        return ahead, head.ended and head.buffered <= n

    # -- helpers --------------------------------------------------------------------

    def _open_utterance(self, now: float) -> _Utterance:
        utt = _Utterance(self._next_id, first_arrival=now, last_arrival=now)
        self._next_id += 1
        self._utts.append(utt)
        self._open = utt
        # Each utterance has its own media clock: arrival delays restart from it.
        self._media_s = 0.0
        self._window.clear()
        return utt

    def _ready_to_start(self, utt: _Utterance, now: float) -> bool:
        if utt.ended:
            return utt.buffered > 0
        if utt.buffered >= self._ms_to_samples(self._start_level_ms(now)):
            return True
        # A short utterance whose end never came must not wait forever. Its source has
        # been silent for the stall timeout, so what is here is all there is: play it as
        # ended, rather than run dry after it and wait out the timeout a second time.
        if utt.buffered > 0 and now - utt.last_arrival >= self.config.stall_timeout_ms / 1e3:
            self._stall(utt)
            return True
        return False

    def _take(self, utt: _Utterance, out: np.ndarray, now: float) -> int:
        want = len(out)
        if self.config.stretch:
            self._commit(utt, want)
        got = 0
        delay = 0.0
        for chunks in (utt.ready, utt.chunks):
            while got < want and chunks:
                chunk = chunks[0]
                n = min(want - got, chunk.remaining)
                out[got : got + n] = chunk.samples[chunk.offset : chunk.offset + n]
                if chunk.src < 0:
                    utt.played += n
                else:  # a stretched block: its source, in proportion (exact once whole)
                    size = len(chunk.samples)
                    utt.played += ((chunk.offset + n) * chunk.src // size
                                   - chunk.offset * chunk.src // size)
                chunk.offset += n
                got += n
                delay += n * max(0.0, now - chunk.arrival)
                if chunk.remaining == 0:
                    chunks.popleft()
            if chunks is utt.ready:
                utt.ready_len -= got
        utt.buffered -= got
        self._since_op += got
        self._buffered -= got
        self.stats.emitted_samples += got
        self.stats.delay_sample_seconds += delay
        return got

    # -- time-stretching ----------------------------------------------------------------

    def _decide(self, utt: _Utterance) -> None:
        """This frame's stretch decision, from the level before the frame is taken."""
        self._op = None
        cfg = self.config
        if not cfg.stretch:
            return
        # The bucket fills with speech played: a frame per pull.
        self._bucket = min(self._bucket_max,
                           self._bucket + self._fs * cfg.stretch_rate_pct / 100.0)
        if utt.ended or self._since_op < self._op_gap or self._bucket < self._min_period:
            return
        level_ms = 1000.0 * utt.buffered / self._rate
        if level_ms > self._target_ms + _ACCEL_MARGIN_MS and self._target_ms < cfg.max_ms:
            # How far the source has run ahead of real time since the utterance began. A
            # real-time source is never far ahead (late, if anything); one held back by
            # back-pressure is, and would refill whatever was drained.
            ahead_ms = 1000.0 * (utt.received / self._rate
                                 - (utt.last_arrival - utt.first_arrival))
            if ahead_ms < _AHEAD_FRAC * cfg.max_ms:
                self._op = "accelerate"
        elif (level_ms < self._expand_below_ms()
              or level_ms - cfg.frame_ms < min(self._chunk_ms, _TROUGH_MAX_MS)):
            self._op = "expand"

    def _expand_below_ms(self) -> float:
        # The spike level, too: mid-utterance the level sagged to 60 % of the target and a
        # burst like the last one then ran it dry (heavy traces, six 10-minute sessions:
        # 21 underruns after the first utterance; 2 holding the spike level).
        return max(_EXPAND_FRAC * self._target_ms, self._spike_level_ms(self._last_arrival))

    def _commit(self, utt: _Utterance, n: int) -> None:
        """Make the first ``n`` samples left to play final (or all there are), after
        applying this frame's decision where committed audio ends."""
        if self._op is not None:
            self._apply(utt)
        while utt.ready_len < n and utt.chunks:
            chunk = utt.chunks[0]
            k = min(n - utt.ready_len, chunk.remaining)
            utt.ready.append(_Chunk(chunk.samples[chunk.offset : chunk.offset + k],
                                    chunk.arrival))
            chunk.offset += k
            if chunk.remaining == 0:
                utt.chunks.popleft()
            utt.ready_len += k

    def _apply(self, utt: _Utterance) -> None:
        """This frame's decision, at the boundary of committed and uncommitted audio:
        on the next block of source when one is here (30 ms at least); otherwise, to
        expand, by repeating the last period of what is committed and not yet played
        (the level is low, so the look-ahead has committed everything there is). Left
        pending when neither can be done: a later commit of this frame may manage."""
        avail = utt.buffered - utt.ready_len  # source samples not committed yet
        op = self._op
        max_p = int(self._bucket)
        if avail >= self._min_block:
            self._op = None  # one attempt per frame
            seg, arrival = self._pop_source(utt, min(avail, max(self._fs, self._min_block)))
            res = (accelerate if op == "accelerate" else expand)(seg, self._rate, max_p)
            src = len(seg)
        elif op == "expand" and utt.ready_len >= self._min_block:
            self._op = None
            tail = self._ready_tail(utt, self._min_block)
            ext = extend(tail, self._rate, max_p)
            # Only the repeat is new; it stands for no source samples at all.
            res = Stretched(ext.audio[len(tail) :], ext.period, ext.correlation)
            arrival, src = utt.ready[-1].arrival, 0
        else:
            return
        p = res.period
        if p:
            self._bucket -= p
            self._since_op = 0
            self._op_gap = math.ceil(p * 100.0 / self.config.stretch_burst_pct) - p
            delta = -p if op == "accelerate" else p
            utt.buffered += delta
            self._buffered += delta
            if delta < 0:
                self.stats.removed_samples_for_acceleration += p
            else:
                self.stats.inserted_samples_for_deceleration += p
        if len(res.audio):
            utt.ready.append(_Chunk(res.audio, arrival, src=src if p else -1))
            utt.ready_len += len(res.audio)

    @staticmethod
    def _ready_tail(utt: _Utterance, n: int) -> np.ndarray:
        """The last ``n`` committed samples not yet played (there are at least ``n``)."""
        parts: list[np.ndarray] = []
        need = n
        for chunk in reversed(utt.ready):
            part = chunk.samples[max(chunk.offset, len(chunk.samples) - need) :]
            parts.append(part)
            need -= len(part)
            if need <= 0:
                break
        return np.concatenate(parts[::-1])

    @staticmethod
    def _pop_source(utt: _Utterance, n: int) -> tuple[np.ndarray, float]:
        """The next ``n`` uncommitted source samples, copied out of their chunks."""
        parts: list[np.ndarray] = []
        arrival = utt.chunks[0].arrival
        need = n
        while need:
            chunk = utt.chunks[0]
            k = min(need, chunk.remaining)
            parts.append(chunk.samples[chunk.offset : chunk.offset + k])
            chunk.offset += k
            need -= k
            if chunk.remaining == 0:
                utt.chunks.popleft()
        return np.concatenate(parts), arrival

    def _conceal(self, utt: _Utterance, now: float, events: list[JitterEvent]) -> PullResult:
        self.stats.concealed_samples += self._fs
        self._concealed_run += self._fs
        if 1000.0 * self._concealed_run / self._rate >= self.config.stall_timeout_ms:
            # The source went away mid-utterance without an end: stop waiting for it.
            self._stall(utt)
            if utt.buffered == 0:
                self._finish(utt, events, interrupted=False, reason="stalled")
            # Otherwise a scrap too short to resume on came in during the underrun: the
            # next pull plays it (the utterance has ended now) and then finishes. Nothing
            # is dropped, and the buffer's level stays true.
        return PullResult(self._silence, 0, self._fs, utt.id, events)

    def _stall(self, utt: _Utterance) -> None:
        """End an utterance whose source went silent without ending it."""
        if self._open is utt:
            self._open = None
        utt.ended = True
        utt.stalled = True

    @staticmethod
    def _end_reason(utt: _Utterance) -> str:
        return "stalled" if utt.stalled else "end"

    def _finish(
        self, utt: _Utterance, events: list[JitterEvent], *, interrupted: bool, reason: str
    ) -> None:
        events.append(PlaybackFinished(utt.id, self._position_ms(utt), interrupted, reason))
        self.stats.utterances_finished += 1
        self._utts.popleft()
        self._concealed_run = 0
        self._op = None  # a decision is the playing utterance's, never the next one's
        self._state = self.IDLE

    def _check_refill(self, events: list[JitterEvent]) -> None:
        head = self._utts[0]
        if head.ended:
            return  # the rest is already here: asking for more would be noise
        level = 1000.0 * head.buffered / self._rate
        low = self._target_ms * self.config.refill_pct / 100.0
        if level < low and self._refill_armed:
            self._refill_armed = False
            events.append(Refill(level, self._target_ms))
        elif level >= low:
            self._refill_armed = True

    def _measure_arrival(self, n: int, now: float) -> None:
        cfg = self.config
        self._media_s += n / self._rate
        # Chunks landing in an already full buffer say nothing about underrun risk, and
        # under back-pressure they would read as large delays against the early burst.
        informative = self._buffered < self._ms_to_samples(self._target_ms)
        delay = now - self._media_s
        lowest = self._window.push(now, delay)
        self._last_arrival = now
        if not informative:
            return
        relative_ms = 1000.0 * (delay - lowest)
        self._peaks.push(now, relative_ms)
        forget = 0.5 ** ((n / self._rate) / cfg.half_life_s)
        q_ms = self._delays.add(relative_ms, forget)
        floor = cfg.min_target_ms
        if self._learned_s < _LEARN_S:
            self._learned_s += n / self._rate
            floor = cfg.target_ms
        self._target_ms = min(cfg.max_ms, max(floor, q_ms + self._headroom_ms()))

    def _headroom_ms(self) -> float:
        # Playout takes a whole frame at a time, at a tick phase unrelated to arrivals.
        return 2.0 * self.config.frame_ms

    def _ms_to_samples(self, ms: float) -> int:
        return math.ceil(ms * self._rate / 1000.0)

    def _position_ms(self, utt: _Utterance) -> float:
        return 1000.0 * utt.played / self._rate
