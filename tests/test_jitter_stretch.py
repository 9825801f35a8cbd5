"""The jitter buffer's time-stretching (``JitterConfig(stretch=True)``): it drains toward
the target, stretches before an underrun, keeps positions in source samples, shows the
look-ahead exactly what will play, and an interrupt still flushes at once.

Pure: arrival schedules are fed by hand, a few seconds of speech-like audio each.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from rapido.bench.traces import Arrival, make_trace, play_trace, unpunctual
from rapido.engine import Engine
from rapido.metrics import Metrics
from rapido.pipeline import jitter as jitter_module
from rapido.pipeline.audio import Resampler
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.events import SessionEvent
from rapido.pipeline.jitter import (
    AudioJitterBuffer,
    JitterConfig,
    JitterEvent,
    JitterStats,
    PlaybackFinished,
    PlaybackStarted,
    PullResult,
    Underrun,
)
from rapido.pipeline.render import FrameJob
from rapido.pipeline.session import SessionCounters, SessionSpec, StreamSession
from rapido.pipeline.sinks.null import NullSink
from rapido.pipeline.speech import speech_like

RATE = 48_000
FS = 1920
CHUNK = 960  # 20 ms
TICK = 0.04
PHASE = 0.013
LOOKAHEAD = 6509  # what the built-in models' look-ahead reads (135.6 ms)

# Stretching on and off at one start level (the one a buffer without it needs), so what
# differs is the stretching; the defaults' lower start is held against OFF below.
ON = JitterConfig(stretch=True, start_ms=128.0)
OFF = JitterConfig(stretch=False, start_ms=128.0)


def voice(seconds: float, seed: int = 0) -> np.ndarray:
    return speech_like(seconds, rate=RATE, seed=seed)


@dataclass
class Run:
    pulls: list[PullResult] = field(default_factory=list)
    level_ms: list[float] = field(default_factory=list)  # before each pull
    target_ms: list[float] = field(default_factory=list)
    # Per pull: (samples played before it, what the look-ahead read after it).
    ahead: list[tuple[int, np.ndarray]] = field(default_factory=list)

    @property
    def played(self) -> np.ndarray:
        return np.concatenate([p.audio[: p.real_samples] for p in self.pulls])

    @property
    def events(self) -> list[JitterEvent]:
        return [ev for p in self.pulls for ev in p.events]


def feed(jb: AudioJitterBuffer, audio: np.ndarray, *, every_s: float = 0.02,
         end: bool = True, lookahead: bool = False, extra_s: float = 1.0) -> Run:
    """``audio`` in 20 ms chunks, one each ``every_s`` from t=0 (0.02: real time), and
    the end marker after the last; a pull every 40 ms, and with ``lookahead`` the
    model's look-ahead read after each pull, as the session does."""
    chunks = [audio[i : i + CHUNK] for i in range(0, len(audio), CHUNK)]
    last_t = (len(chunks) - 1) * every_s
    run = Run()
    k = 0
    nxt = 0
    while True:
        now = PHASE + k * TICK
        while nxt < len(chunks) and nxt * every_s <= now:
            jb.push(chunks[nxt], nxt * every_s)
            nxt += 1
            if nxt == len(chunks) and end:
                jb.end_utterance(last_t)
        run.level_ms.append(jb.buffered_ms)
        pull = jb.pull(now)
        run.pulls.append(pull)
        run.target_ms.append(jb.target_ms)
        if lookahead and pull.utterance is not None:
            before = sum(p.real_samples for p in run.pulls)
            run.ahead.append((before, jb.lookahead(pull.utterance, LOOKAHEAD)[0].copy()))
        k += 1
        if now > last_t + extra_s and nxt == len(chunks) and not jb.buffered_samples:
            return run


def accounted(jb: AudioJitterBuffer, run: Run) -> None:
    """Every sample received was played, or removed or inserted as counted: no more."""
    s = jb.stats
    assert s.emitted_samples == len(run.played)
    assert s.emitted_samples + s.flushed_samples + jb.buffered_samples == (
        s.received_samples - s.removed_samples_for_acceleration
        + s.inserted_samples_for_deceleration)
    if not s.flushed_samples and not jb.buffered_samples:
        # Positions are source samples: each frame says how many it stands for.
        assert sum(p.source_samples for p in run.pulls) == s.received_samples


def test_drains_a_high_level_toward_the_target() -> None:
    """An utterance starts at 128 ms (the initial 160 ms target's start level) on a link
    with no jitter at all, where the target falls to its 80 ms floor once the histogram
    has forgotten its seed (about 7 s): the level left above it is latency for nothing.
    Stretching removes it, by whole periods; without, it stays to the end."""
    audio = voice(12.0)
    off, on = AudioJitterBuffer(OFF), AudioJitterBuffer(ON)
    r_off, r_on = feed(off, audio), feed(on, audio)
    late = slice(int(10.0 / TICK), int(11.5 / TICK))  # the last seconds of speech
    assert min(r_off.level_ms[late]) >= 120.0
    assert max(r_on.level_ms[late]) <= max(r_on.target_ms[late]) + 20.0 + 20.0
    s = on.stats
    assert s.underruns == 0 and s.inserted_samples_for_deceleration == 0
    # It removed what the level lost, about 40 ms, within the sustained 5 % bound.
    assert 20 * 48 <= s.removed_samples_for_acceleration <= 0.05 * len(audio)
    accounted(on, r_on)
    assert np.array_equal(r_off.played, audio)  # off: played verbatim
    # The position at the end is the source's, not the (shorter) played length.
    for r in (r_off, r_on):
        assert [ev for ev in r.events if isinstance(ev, PlaybackFinished)] == [
            PlaybackFinished(1, 12000.0, False, "end")]


def test_stretches_before_an_underrun_on_a_slow_feed() -> None:
    """A source 4.8 % slower than real time (a 20 ms chunk every 21 ms) drains the buffer:
    without stretching it runs dry; with it, periods inserted (at most 5 % sustained)
    make up the difference before that happens."""
    audio = voice(6.0, seed=1)
    off, on = AudioJitterBuffer(OFF), AudioJitterBuffer(ON)
    feed(off, audio, every_s=0.021)
    r_on = feed(on, audio, every_s=0.021)
    assert off.stats.underruns >= 1
    assert on.stats.underruns == 0 and on.stats.concealed_samples == 0
    s = on.stats
    assert s.inserted_samples_for_deceleration > 0 and s.removed_samples_for_acceleration == 0
    accounted(on, r_on)
    assert [ev for ev in r_on.events if isinstance(ev, PlaybackFinished)] == [
        PlaybackFinished(1, 6000.0, False, "end")]


def test_the_look_ahead_sees_exactly_what_plays() -> None:
    """Stretch decisions are made before the look-ahead reads the audio: whatever it read
    after a pull is what the next pulls play, sample for sample."""
    audio = voice(5.0, seed=2)
    jb = AudioJitterBuffer(ON)
    r = feed(jb, audio, every_s=0.021, lookahead=True)  # slow: periods get inserted
    assert jb.stats.inserted_samples_for_deceleration > 0  # stretching did happen
    played = r.played
    for before, ahead in r.ahead:
        start = before  # the look-ahead starts after what has played
        assert np.array_equal(played[start : start + len(ahead)], ahead)
    accounted(jb, r)


def test_interrupt_flushes_within_a_frame_and_reports_the_source_position() -> None:
    audio = voice(4.0, seed=3)
    jb = AudioJitterBuffer(ON)
    run = Run()
    chunks = [audio[i : i + CHUNK] for i in range(0, len(audio), CHUNK)]
    k = 0
    for i, chunk in enumerate(chunks[:150]):  # a slow source: periods get inserted
        jb.push(chunk, i * 0.021)
        while (now := PHASE + k * TICK) <= i * 0.021:
            run.pulls.append(jb.pull(now))
            jb.peek(LOOKAHEAD)  # the look-ahead has committed blocks ahead
            k += 1
    assert jb.stats.inserted_samples_for_deceleration > 0
    source_played = sum(p.source_samples for p in run.pulls)
    assert source_played != len(run.played)  # stretched: the two counts differ
    # Independently of the frames' own counts: only periods were inserted, so the source
    # played is what was played less what was inserted and has played (not all has).
    played, inserted = len(run.played), jb.stats.inserted_samples_for_deceleration
    assert played - inserted <= source_played < played
    fin = jb.flush(PHASE + k * TICK)
    # The position is where playback stopped in the source, not in what was played.
    assert fin == [PlaybackFinished(1, 1000.0 * source_played / RATE, True, "interrupt")]
    nxt = jb.pull(PHASE + (k + 1) * TICK)  # the very next frame is silence
    assert nxt.real_samples == 0 and not nxt.audio.any() and jb.buffered_samples == 0
    accounted(jb, run)


def test_no_stretching_once_the_end_is_in_nor_across_utterances() -> None:
    """Utterances that arrive whole (an upload) are never stretched, however much is
    buffered; each plays verbatim and ends at its own length."""
    a, b = voice(2.0, seed=4), voice(1.5, seed=5)
    jb = AudioJitterBuffer(ON)
    jb.push(a, 0.0)
    jb.end_utterance(0.0)
    jb.push(b, 0.0)
    jb.end_utterance(0.0)
    pulls = [jb.pull(PHASE + k * TICK) for k in range(100)]
    played = np.concatenate([p.audio[: p.real_samples] for p in pulls])
    assert np.array_equal(played, np.concatenate([a, b]))
    assert jb.stats.removed_samples_for_acceleration == 0
    fins = [ev for p in pulls for ev in p.events if isinstance(ev, PlaybackFinished)]
    assert [(f.utterance, f.position_ms) for f in fins] == [(1, 2000.0), (2, 1500.0)]


def test_faster_than_real_time_source_held_by_backpressure_is_not_sped_up() -> None:
    """TTS faster than real time keeps the buffer at max_ms through back-pressure: that
    is not latency to drain, and accelerating would only speed the voice up."""
    trace = make_trace("tts_fast", duration_s=8.0, seed=0)
    r = play_trace(AudioJitterBuffer(ON), trace, audio=voice(3.0), backpressure=True)
    assert r.stats.removed_samples_for_acceleration == 0
    assert r.stats.underruns == 0


class WithLookahead(AudioJitterBuffer):
    """Read the model's look-ahead after every speaking pull, as the session does: it
    commits 135.6 ms ahead, so the stretch decisions must work around it."""

    def pull(self, now: float) -> PullResult:
        result = super().pull(now)
        if result.speaking and result.utterance is not None:
            self.lookahead(result.utterance, LOOKAHEAD)
        return result


@pytest.mark.parametrize("buffer", [AudioJitterBuffer, WithLookahead])
def test_profiles_with_stretching_lose_nothing_and_underrun_no_more(
        buffer: type[AudioJitterBuffer]) -> None:
    """Bursty links: stretching on never underruns more than off and every sample is
    accounted for; with the model's look-ahead too. On moderate jitter the mean delay
    falls (a little more for a period inserted now and then: at most 5 ms); on heavy
    jitter stretching holds the level at the last spike, which costs up to 30 ms in
    these 30 s traces (over ten minutes it is OFF's delay with a quarter of its
    underruns: BENCHMARKS.md)."""
    audio = voice(7.0, seed=6)
    for profile in ("moderate", "heavy"):
        delay_on = delay_off = 0.0
        for seed in range(2):
            trace = make_trace(profile, duration_s=30.0, seed=seed)
            off = play_trace(buffer(OFF), trace, audio=audio)
            on = play_trace(buffer(ON), trace, audio=audio)
            s = on.stats
            assert s.underruns <= off.stats.underruns, (profile, seed)
            more = 5.0 if profile == "moderate" else 30.0
            assert s.mean_delay_ms <= off.stats.mean_delay_ms + more, (profile, seed)
            delay_on += s.mean_delay_ms
            delay_off += off.stats.mean_delay_ms
            assert s.emitted_samples == len(on.played) == (
                s.received_samples - s.removed_samples_for_acceleration
                + s.inserted_samples_for_deceleration)
            assert len(on.of_type(Underrun)) == s.underruns
            # Positions stay the source's: every utterance ends at its full length.
            assert [e.event.position_ms for e in on.of_type(PlaybackFinished)] == [
                e.event.position_ms for e in off.of_type(PlaybackFinished)]
        if profile == "moderate":
            assert delay_on < delay_off - 5.0, profile


def test_the_defaults_start_sooner_than_a_buffer_without_stretching() -> None:
    """The defaults (a 96 ms start, stretching on) against OFF (128 ms, the start a buffer
    without stretching needs), with the model's look-ahead, on every profile's traces:
    speech starts sooner and waits less in the buffer (10 ms or more where the
    link leaves room: 40 on steady), with no more underruns; on moderate jitter the
    start waits for 1.5x the learned delay quantile, about OFF's start, so there it
    is no later and waits no longer (5-14 ms less); except on heavy jitter,
    where these 30 s show up to 2 against OFF's none, and the level held at the last
    spike waits up to 20 ms longer (over ten minutes: OFF's delay, a quarter of its
    underruns, BENCHMARKS.md)."""
    defaults = JitterConfig()
    assert defaults.stretch and defaults.start_ms < OFF.start_ms
    audio = voice(7.0, seed=1)
    for profile in ("steady", "moderate", "heavy", "tts_fast", "stalls"):
        for seed in range(2):
            trace = make_trace(profile, duration_s=30.0, seed=seed)
            tts = profile == "tts_fast"
            off = play_trace(WithLookahead(OFF), trace, audio=audio, backpressure=tts)
            new = play_trace(WithLookahead(defaults), trace, audio=audio, backpressure=tts)
            allowed = 2 if profile == "heavy" else 0
            assert new.underruns <= off.underruns + allowed, (profile, seed)
            if tts:  # held at max_ms by back-pressure either way
                continue
            # Each utterance starts no later, and sooner on the whole (by whole frames:
            # the tick that finds the start level buffered).
            starts_off = [e.frame for e in off.of_type(PlaybackStarted)]
            starts_new = [e.frame for e in new.of_type(PlaybackStarted)]
            assert len(starts_new) == len(starts_off) >= 5
            assert all(n <= o for n, o in zip(starts_new, starts_off, strict=True))
            if profile == "moderate":
                # The start also covers 1.5x the learned delay quantile, which on this
                # link is about OFF's start: no later, sooner now and then (0-2 frames in
                # these 30 s), and never waiting longer in the buffer.
                assert new.stats.mean_delay_ms <= off.stats.mean_delay_ms, (profile, seed)
                continue
            assert sum(starts_new) < sum(starts_off), (profile, seed)
            if profile == "steady":
                assert new.stats.mean_delay_ms <= off.stats.mean_delay_ms - 10.0, (profile, seed)
            elif profile == "heavy":  # the level held at the last spike (see above)
                assert new.stats.mean_delay_ms <= off.stats.mean_delay_ms + 20.0, (profile, seed)
            else:
                assert new.stats.mean_delay_ms <= off.stats.mean_delay_ms, (profile, seed)


def _as_resampled_16k(trace: list[Arrival]) -> list[Arrival]:
    """The trace with each chunk's size as a session pushes it for a 16 kHz client:
    what the real resampler gives for a third as many input samples, the filter's tail
    arriving with the utterance's end."""
    out: list[Arrival] = []
    rs = Resampler(16_000)
    for a in trace:
        if a.end:
            out.append(Arrival(a.t, len(rs.flush())))
            out.append(a)
            continue
        out.append(Arrival(a.t, len(rs.push(np.zeros(a.samples // 3, np.int16)))))
    return [a for a in out if a.end or a.samples]


def _underruns_16k(profile: str, seeds: int, late_s: float = 0.0) -> int:
    audio = voice(7.0, seed=1)
    total = 0
    for seed in range(seeds):
        trace = make_trace(profile, duration_s=60.0, seed=seed, utterance_s=3.0,
                           pause_s=3.0)
        if late_s:
            trace = unpunctual(trace, late_s, seed)
        trace = _as_resampled_16k(trace)
        assert trace[0].samples == 960 - 48  # the resampler's delay, held back
        r = play_trace(WithLookahead(JitterConfig()), trace, audio=audio,
                       phase_s=0.0016 * (7 * seed % 25))
        total += r.underruns
    return total


@pytest.mark.parametrize(("profile", "seeds", "late_s"), [
    ("moderate", 8, 0.0),  # 8 underruns with the old rules, 0 now
    ("steady", 16, 0.004),  # a client up to 4 ms late: 9, 1
])
def test_a_16k_streams_resampler_delay_does_not_run_the_buffer_dry(
        monkeypatch: pytest.MonkeyPatch, profile: str, seeds: int, late_s: float) -> None:
    """The cause of most underruns left in the live bench, on moderate jitter and over
    HTTP on a calm link: the resampler holds back its group delay (48 samples at 48 kHz)
    until an utterance ends, so the level sits 1 ms under every 20 ms chunk boundary;
    parked at the start level (60 % of the target) it dipped to 19 ms after each frame,
    and a chunk landing a little late left the next frame 1 ms short. Expanding below
    60 % of the target (not 50 %), and whenever less than a chunk would be left after the
    frame, lifts it. Counted with the old rules and with the current ones."""
    monkeypatch.setattr(jitter_module, "_EXPAND_FRAC", 0.5)
    monkeypatch.setattr(jitter_module, "_TROUGH_MAX_MS", 0.0)
    monkeypatch.setattr(jitter_module.AudioJitterBuffer, "_expand_below_ms",
                        lambda self: 0.5 * self.target_ms)  # no spike level held then
    # Nor did the start cover the delay quantile's tail (which cures these too).
    monkeypatch.setattr(jitter_module.AudioJitterBuffer, "_tail_level_ms", lambda self: 0.0)
    old = _underruns_16k(profile, seeds, late_s)
    monkeypatch.undo()
    new = _underruns_16k(profile, seeds, late_s)
    assert old >= 5 and new <= 1, (old, new)


def _sessions(profile: str, seeds: int) -> list[Any]:
    """Minute-long sessions of 3 s utterances with half-second pauses, from a client up
    to 5 ms late, each at its own tick phase, with the model's look-ahead."""
    audio = voice(7.0, seed=1)
    runs = []
    for seed in range(seeds):
        trace = make_trace(profile, duration_s=60.0, utterance_s=3.0, pause_s=0.5,
                           seed=1000 + seed)
        runs.append(play_trace(WithLookahead(JitterConfig()), unpunctual(trace, 0.005, seed),
                               audio=audio, phase_s=(seed * 0.0037) % 0.04))
    return runs


def test_the_start_covers_the_tail_of_the_learned_delays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The cause of the moderate-jitter underruns left in the live bench: an utterance
    started at 60 % of a learned target (its 95 % delay quantile + two frames) rides on
    the few chunks that made that level; when those came early and the next ones late,
    it ran dry within its first few hundred ms. The start now waits, too, for a frame
    plus 1.5x the learned quantile (up to 80 % of the target). A hundred stream-minutes
    of moderate jitter, with and without: underruns 3 -> 0, for half a frame of onset
    and 8 ms of delay on average (up to two frames and 16 ms in a session). On a steady
    link the quantile is ~0 and stalls saturate the target: the very same playout; heavy
    jitter's bursts are the spike level's to cover: no more underruns, no more delay."""
    new = _sessions("moderate", 100)
    calm = {p: _sessions(p, 4) for p in ("steady", "stalls")}
    heavy = _sessions("heavy", 4)
    monkeypatch.setattr(jitter_module.AudioJitterBuffer, "_tail_level_ms", lambda self: 0.0)
    old = _sessions("moderate", 100)
    old_calm = {p: _sessions(p, 4) for p in ("steady", "stalls")}
    old_heavy = _sessions("heavy", 4)
    monkeypatch.undo()

    assert sum(r.underruns for r in old) >= 3
    assert sum(r.underruns for r in new) == 0
    for a, b in zip(new, old, strict=True):
        for r in (a, b):  # every sample pushed is played, less or more what was stretched
            st = r.stats
            assert (st.emitted_samples - st.inserted_samples_for_deceleration
                    + st.removed_samples_for_acceleration) == len(r.pushed)
        assert a.stats.mean_delay_ms <= b.stats.mean_delay_ms + 20.0
    assert (np.mean([r.stats.mean_delay_ms for r in new])
            <= np.mean([r.stats.mean_delay_ms for r in old]) + 10.0)
    starts = [[e.frame for e in r.of_type(PlaybackStarted)] for r in (*new, *old)]
    late = [n - o for s_new, s_old in zip(starts[:100], starts[100:], strict=True)
            for n, o in zip(s_new, s_old, strict=True)]
    assert min(late) >= 0 and np.mean(late) <= 1.0  # whole frames: the tick that finds it
    for profile, runs in calm.items():
        for a, b in zip(runs, old_calm[profile], strict=True):
            assert np.array_equal(a.played, b.played), profile
    # Heavy jitter's tail is bursts, which the spike level covers: capped at 80 % of the
    # target the tail rarely binds there.
    assert sum(r.underruns for r in heavy) <= sum(r.underruns for r in old_heavy)
    for a, b in zip(heavy, old_heavy, strict=True):
        assert a.stats.mean_delay_ms <= b.stats.mean_delay_ms + 2.0


class HoldingRenderer:
    """Finishes the first ``finish`` frames (idle pictures) and holds the rest, as a busy
    model does: an interrupt then drops the held ones."""

    lookahead_samples = LOOKAHEAD

    def __init__(self, finish: int) -> None:
        self.finish = finish
        self.held: list[FrameJob] = []
        self.shown_source = 0  # source samples of the frames finished

    def prepare(self, avatar: Avatar) -> None:
        pass

    def submit(self, job: FrameJob) -> None:
        if job.index < self.finish:
            self.shown_source += job.source_samples
            job.video = job.avatar.idle_frame(job.index)
            job.done()
        else:
            self.held.append(job)

    def close_stream(self, stream: str) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        pass


async def test_interrupt_dropping_stretched_frames_reports_the_source_position() -> None:
    """Frames a model still holds when an interrupt comes are dropped, and the finish's
    position leaves out the *source* samples they stood for (not their played length,
    which stretching made longer)."""
    tiny = Avatar("tiny", 16, 16, 25, np.zeros((1, 24, 16), np.uint8),
                  np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32))
    renderer = HoldingRenderer(finish=60)
    session = StreamSession("s1", SessionSpec(lesson_id="l"), avatar=tiny, sink=NullSink(),
                            renderer=renderer, jitter=ON, fps=25, max_queued_s=10.0)
    told: list[SessionEvent | None] = []
    told_queue: asyncio.Queue[SessionEvent | None] = asyncio.Queue()
    session.add_listener(told_queue)
    audio = voice(4.0, seed=7)
    k = 0
    for i in range(0, 150):  # 3 s of a slow source: periods get inserted
        session.jb.push(audio[i * CHUNK : (i + 1) * CHUNK], i * 0.021)
        while (now := PHASE + k * TICK) <= i * 0.021:
            session.tick(now)
            k += 1
    held = renderer.held
    # The held frames were stretched: their played length is not their source length.
    assert held and sum(j.source_samples for j in held) != sum(j.real_samples for j in held)
    session.interrupt()
    while not told_queue.empty():
        told.append(told_queue.get_nowait())
    fin = [ev for ev in told if isinstance(ev, PlaybackFinished)]
    # 60 frames reached the sink: the position is the source samples they carried.
    assert fin == [PlaybackFinished(1, round(1000.0 * renderer.shown_source / RATE, 1),
                                    True, "interrupt")]


def test_stretch_counters_are_folded_into_the_node_metrics_once() -> None:
    metrics = Metrics()
    node = SimpleNamespace(metrics=metrics, sessions={})
    stats = JitterStats(received_samples=96_000, removed_samples_for_acceleration=4_800,
                        inserted_samples_for_deceleration=2_400)
    session = SimpleNamespace(jb=SimpleNamespace(stats=stats), counters=SessionCounters())
    # The engine's bookkeeping, on stand-ins: it reads only these attributes.
    fold = Engine._account_audio
    fold(cast(Engine, node), [cast(StreamSession, session)])
    fold(cast(Engine, node), [cast(StreamSession, session)])  # nothing new: adds 0

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert value("audio_removed_for_acceleration_seconds_total") == pytest.approx(0.1)
    assert value("audio_inserted_for_deceleration_seconds_total") == pytest.approx(0.05)
    assert value("audio_received_seconds_total") == pytest.approx(2.0)
