"""``rapido bench``: N synthetic streams through the real engine, in this process.

Each stream gets speech (:func:`rapido.pipeline.speech.syllables`: syllables and gaps of
random length, so the lip-sync lag measured on the output has one answer) the way a TTS
over a WebSocket would deliver it: 20 ms chunks,
utterances of a few seconds separated by pauses according to the duty cycle, arriving on
the schedule of a jitter trace (:mod:`rapido.bench.traces`; ``steady`` is exactly real
time). The engine, jitter buffers, resampling, model batching and sinks are the real
ones; only the sockets are left out (``--http`` drives a running server over them, see
:mod:`rapido.bench.http`). Reporting lives in :mod:`rapido.bench.report`.

Why one module over 500 lines: one measured run (streams, hooks, snapshots, the result's
~60 figures) and the capacity search over it share their state; the report is elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rapido.aio import cancel_and_wait
from rapido.bench import histograms, report
from rapido.bench.args import validate
from rapido.bench.profile import (
    RATE_HZ,
    GilRecorder,
    GilRow,
    flame_svg,
    gil_table,
    parse_collapsed,
    table_text,
)
from rapido.bench.standin import STANDIN, StandinModel
from rapido.bench.traces import Arrival, make_trace
from rapido.config import Config
from rapido.engine import Engine
from rapido.gpu.registry import open_model
from rapido.heap import GcPauses, freeze_heap
from rapido.metrics import Metrics
from rapido.pipeline.events import PlaybackStarted
from rapido.pipeline.lipsync_lag import LagMeter, measure_lag, mouth_region
from rapido.pipeline.media import AUDIO_RATE, MediaChunk
from rapido.pipeline.session import SessionClosed, SessionSpec, StreamSession
from rapido.pipeline.sinks.base import Adaptive
from rapido.pipeline.speech import syllables
from rapido.wiring import build_engine

INPUT_RATE = 16_000
CHUNK_S = 0.02
UTTERANCE_S = 3.0
#: Streams' start phases are spread over this much time, so they do not all speak at once.
PHASE_SPREAD_S = 0.37
#: Streams whose mouth-to-sound lag the frame hook measures (pooled): enough for a sharp
#: peak, few enough that the hook's work stays out of the CPU figures.
LAG_STREAMS = 4


@dataclass
class BenchResult:
    streams: int
    duration_s: float
    speech_duty: float
    sink: str
    fps_min: float
    fps_median: float
    lateness_p50_ms: float  # histogram-based (upper bucket bounds)
    lateness_p95_ms: float
    lateness_p99_ms: float
    late_frames: int
    underruns: int
    underruns_per_session: float
    cpu_percent: float
    cpu_ms_per_stream_second: float
    tick_p99_ms: float
    realtime: bool
    # -- the model, batching, exact lateness and onsets ------------------------------------
    model: str = ""
    backend: str = ""
    device: str = ""
    jitter: str = "steady"
    max_batch: int = 0
    max_wait_ms: float = 0.0
    frames_sampled: int = 0
    lateness_exact_p50_ms: float = 0.0  # exact, from every frame of the window
    lateness_exact_p95_ms: float = 0.0
    lateness_exact_p99_ms: float = 0.0
    lateness_exact_max_ms: float = 0.0
    onsets: int = 0
    onset_p50_ms: float | None = None
    onset_p95_ms: float | None = None
    batches: int = 0
    batch_mean: float = 0.0
    batch_hist: dict[str, int] = field(default_factory=dict)
    queue_wait_mean_ms: float | None = None
    queue_wait_p95_ms: float | None = None
    deadline_misses: int = 0
    underruns_by_session: list[int] = field(default_factory=list)
    first_frame_p50_ms: float | None = None
    first_frame_max_ms: float | None = None
    gpu_util_percent: float | None = None
    gpu_mem_used_mb: float | None = None
    partial: bool = False
    # -- encoding sinks and adaptive quality ------------------------------------------------
    #: Chunks a sink dropped because its encoder fell behind (real time needs 0).
    sink_dropped: int = 0
    #: Pictures encoded per second, slowest stream (webrtc, record; None for others).
    encoded_fps_min: float | None = None
    #: Mean publisher quality score at the end of the window, times the share of the
    #: window's chunks the sinks did not drop (None: no publisher).
    quality_score: float | None = None
    adaptive: bool = False
    # -- the jitter buffer's time-stretching (jitter_stretch) and its delay -----------------
    stretch: bool = False
    accelerated_ms: float = 0.0  # speech removed by accelerate, all streams, in the window
    decelerated_ms: float = 0.0  # speech inserted by preemptive expand, likewise
    buffer_delay_ms: float | None = None  # mean time a played sample spent buffered

    # -- lip sync on what the sinks get (rapido.pipeline.lipsync_lag; > 0: mouth late) ------
    lipsync_lag_ms: float | None = None
    lipsync_corr: float | None = None
    lipsync_margin: float | None = None  # near 0: no single peak, the lag means little

    # -- where the GIL went (--profile; rapido.bench.profile) ------------------------------
    gil_us_per_speaking_frame: float | None = None
    gil_stages: list[dict[str, Any]] | None = None
    #: CPU time of the event-loop thread over the window (it holds the GIL while it
    #: computes): its share of one core, and per speaking stream-frame. Read from the
    #: thread's own clock, so unlike the profile's 100 Hz samples it has no sampling
    #: noise; what it leaves out is the model worker's share.
    loop_cpu_percent: float | None = None
    loop_cpu_us_per_speaking_frame: float | None = None

    # -- the garbage collector in the window (rapido.heap; gc_freeze) ---------------------
    gc_freeze: bool = False
    gc_pause_max_ms: float = 0.0  # the longest collection, any generation
    gc_full_collections: int = 0  # generation 2: the ones that walk the whole heap
    gc_ms_per_second: float = 0.0  # all collections' pauses over the window's wall time

    def json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FrameSamples:
    """Per-frame samples for the bench, from the engine's frame hook: the exact lateness
    of every frame handed to a sink while collecting, when each stream's first frame got
    there (loop time), and for a few streams (:meth:`watch`) the mouth region of every
    picture and its audio, for the lip-sync lag."""

    def __init__(self, fps: int) -> None:
        self.fps = fps
        self.collect = False
        self.speaking = 0  # speaking frames handed to sinks while collecting
        self.lateness: list[float] = []
        self.first_frame: dict[str, float] = {}
        self._lag: dict[str, tuple[tuple[slice, slice], LagMeter]] = {}

    def watch(self, session_id: str, region: tuple[slice, slice]) -> None:
        """Measure this stream's lip sync, in the picture's ``region`` (its mouth)."""
        self._lag[session_id] = (region, LagMeter(AUDIO_RATE))

    def on_frame(self, session_id: str, lateness_s: float, chunk: MediaChunk) -> None:
        if session_id not in self.first_frame:
            self.first_frame[session_id] = asyncio.get_running_loop().time()
        if self.collect:
            self.lateness.append(max(0.0, lateness_s))
            self.speaking += chunk.speaking
            lag = self._lag.get(session_id)
            if lag is not None:
                # The chunk's place on the stream clock is the time of both its parts.
                region, meter = lag
                t = chunk.index / self.fps
                meter.add_picture(t, chunk.video.y[region])
                meter.add_audio(t, chunk.audio)

    def lag(self) -> tuple[float | None, float | None, float | None]:
        """Pooled lag, Pearson r and margin over the watched streams (None: no speech)."""
        meters = [m for _, m in self._lag.values() if m.motion()[0].size >= 3]
        if not meters:
            return None, None, None
        try:
            r = measure_lag(meters)
        except ValueError:
            return None, None, None
        return round(r.lag_ms, 1), round(r.corr, 3), round(r.margin, 3)


@dataclass
class _Stream:
    session: StreamSession
    created_at: float  # loop time just before create_session
    fed: list[float] = field(default_factory=list)  # first chunk of each utterance fed
    started: list[float] = field(default_factory=list)  # its playback_started at the sink


def stream_trace(profile: str, duty: float, length_s: float, seed: int,
                 rate: int = INPUT_RATE) -> list[Arrival]:
    """The arrivals one bench stream follows: ``UTTERANCE_S`` utterances with pauses for
    the duty cycle, perturbed by ``profile``. Empty for a silent stream (duty 0)."""
    if duty <= 0:
        return []
    pause = UTTERANCE_S * (1.0 - duty) / duty
    return make_trace(profile, duration_s=length_s, rate=rate, chunk_ms=1000 * CHUNK_S,
                      utterance_s=UTTERANCE_S, pause_s=pause, seed=seed)


async def _drive(st: _Stream, trace: list[Arrival], t0: float, audio: np.ndarray) -> None:
    """Feed one stream ``audio`` following ``trace`` (times relative to ``t0``, loop
    time)."""
    loop = asyncio.get_running_loop()
    session = st.session
    pos = 0
    open_utt = False
    try:
        for a in trace:
            delay = t0 + a.t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if a.end:
                if open_utt:
                    await session.end_utterance()
                    open_utt = False
                continue
            if not open_utt:
                session.start_utterance()
                st.fed.append(loop.time())
                open_utt, pos = True, 0
            end = pos + a.samples
            # A slice where it fits (no copy); np.resize wraps around, at a cost.
            await session.feed(audio[pos:end] if end <= len(audio)
                               else np.resize(audio[pos:], a.samples))
            pos = (pos + a.samples) % len(audio)
    except SessionClosed:
        return


async def _collect_events(st: _Stream) -> None:
    loop = asyncio.get_running_loop()
    q = st.session.subscribe(maxsize=4096)
    while (ev := await q.get()) is not None:
        if isinstance(ev, PlaybackStarted):
            st.started.append(loop.time())


def _run_config(config: Config, max_batch: int | None = None) -> Config:
    return config if max_batch is None else dataclasses.replace(config, max_batch=max_batch)


async def run_once(config: Config, streams: int, duration: float, warmup: float,
                   duty: float, sink: str, *, jitter: str = "steady",
                   progress: report.Progress | None = None,
                   out: list[BenchResult] | None = None,
                   standin: StandinModel | None = None,
                   profile: Path | None = None) -> BenchResult:
    """One measured run. On cancellation (Ctrl-C) during the measurement the window so
    far is measured, appended to ``out`` (marked partial), and the cancellation goes on.
    ``standin``: the free model in place of the config's (``--model standin``).
    ``profile``: record where the GIL goes over the window into this file (py-spy)."""
    metrics = Metrics()
    frames = FrameSamples(config.fps)
    engine = build_engine(dataclasses.replace(config, max_streams=max(streams, 1)), metrics,
                          on_frame=frames.on_frame, opener=standin or open_model)
    loop = asyncio.get_running_loop()
    if progress is not None:
        progress.phase(f"{streams} streams (max_batch {config.max_batch}, starting)",
                       warmup + duration)
    await engine.start()
    if config.gc_freeze:
        freeze_heap()  # as serve does once warm (rapido.node)
    tasks: list[asyncio.Task[None]] = []
    sts: list[_Stream] = []
    result: BenchResult | None = None
    cancelled = False
    try:
        length = warmup + duration + 1.0
        # Every stream's trace and speech before the first session: made in the drivers
        # (~6 ms each, on the loop) they stalled the first tick ~200 ms at 32 streams, and
        # the catch-up ticks ran every stream's first utterance dry.
        plans = [(stream_trace(jitter, duty, length, seed=i),
                  syllables(UTTERANCE_S + 0.5, seed=i)) for i in range(streams)]
        t_base = loop.time()
        for i, (trace, audio) in enumerate(plans):
            created = loop.time()
            s, _ = await engine.create_session(
                SessionSpec(lesson_id=f"bench{i}", sample_rate=INPUT_RATE, sink=sink))
            st = _Stream(s, created)
            sts.append(st)
            if i < LAG_STREAMS:
                y = s.avatar.idle_frame(0)
                frames.watch(s.id, mouth_region(s.avatar.mouth_boxes, 12, y.width, y.height))
            tasks.append(loop.create_task(_collect_events(st), name=f"events-{i}"))
            t0 = t_base + (i % 25) * 0.04 * PHASE_SPREAD_S
            tasks.append(loop.create_task(_drive(st, trace, t0, audio), name=f"drive-{i}"))
        if progress is not None:
            progress.phase(f"{streams} streams (max_batch {config.max_batch})",
                           warmup + duration)
        await asyncio.sleep(warmup)
        snap0 = _snapshot(engine, sts, metrics)
        recorder = GilRecorder(profile) if profile is not None else None
        if recorder is not None:
            await recorder.start()
        frames.collect = True
        pauses = GcPauses().install()
        r0, t0w = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loop_cpu0 = time.thread_time()  # this coroutine runs on the loop's thread
        try:
            await asyncio.sleep(duration)
        except asyncio.CancelledError:
            cancelled = True
        finally:
            pauses.close()
        frames.collect = False
        stacks = await recorder.stop() if recorder is not None else None
        r1, t1w = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loop_cpu = time.thread_time() - loop_cpu0
        result = _result(config, frames, sts, metrics, snap0, _snapshot(engine, sts, metrics),
                         cpu=(r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                         wall=max(t1w - t0w, 1e-6), duty=duty, sink=sink, jitter=jitter,
                         partial=cancelled,
                         model=standin.name if standin else config.model)
        result.loop_cpu_percent = round(100.0 * loop_cpu / max(t1w - t0w, 1e-6), 1)
        if frames.speaking:
            result.loop_cpu_us_per_speaking_frame = round(1e6 * loop_cpu / frames.speaking, 1)
        result.gc_freeze = config.gc_freeze
        result.gc_pause_max_ms = round(pauses.longest_s * 1e3, 2)
        result.gc_full_collections = pauses.count[2]
        result.gc_ms_per_second = round(1e3 * sum(pauses.total_s) / max(t1w - t0w, 1e-6), 2)
        if stacks is not None:
            rows = gil_table(parse_collapsed(stacks), rate_hz=RATE_HZ,
                             speaking_frames=frames.speaking)
            result.gil_stages = [dataclasses.asdict(r) for r in rows]
            result.gil_us_per_speaking_frame = rows[-1].us_per_speaking_frame
        if out is not None:
            out.append(result)
    finally:
        await cancel_and_wait(tasks)
        await engine.aclose()
    if cancelled:
        raise asyncio.CancelledError
    return result


@dataclass
class _Snap:
    frames: list[int]
    underruns: list[int]
    sink_dropped: list[int]
    encoded: list[int | None]
    lat: dict[float, float]
    ticks: dict[float, float]
    batch: dict[float, float]
    wait: dict[float, float]
    wait_sum: float
    wait_count: float
    batcher: dict[str, Any]
    removed: int = 0  # jitter buffers' sums over the streams
    inserted: int = 0
    emitted: int = 0
    delay_ss: float = 0.0
    at: float = 0.0  # loop time of the snapshot


def _snapshot(engine: Engine, sts: list[_Stream], metrics: Metrics) -> _Snap:
    info = engine.renderer.info()
    wait_sum, wait_count = histograms.hist_totals(metrics, "batch_queue_wait_seconds")
    return _Snap(
        frames=[st.session.counters.frames_out for st in sts],
        sink_dropped=[st.session.sink.stats().dropped for st in sts],
        encoded=[st.session.sink.stats().encoded for st in sts],
        underruns=[st.session.jb.stats.underruns for st in sts],
        lat=histograms.hist_snapshot(metrics),
        ticks=histograms.hist_snapshot(metrics, "clock_tick_seconds"),
        batch=histograms.hist_snapshot(metrics, "batch_size"),
        wait=histograms.hist_snapshot(metrics, "batch_queue_wait_seconds"),
        wait_sum=wait_sum, wait_count=wait_count,
        batcher=dict(info.get("batcher") or {}),
        removed=sum(st.session.jb.stats.removed_samples_for_acceleration for st in sts),
        inserted=sum(st.session.jb.stats.inserted_samples_for_deceleration for st in sts),
        emitted=sum(st.session.jb.stats.emitted_samples for st in sts),
        delay_ss=sum(st.session.jb.stats.delay_sample_seconds for st in sts),
        at=asyncio.get_running_loop().time(),
    )


def _result(config: Config, frames: FrameSamples, sts: list[_Stream], metrics: Metrics,
            a: _Snap, b: _Snap, *, cpu: float, wall: float, duty: float, sink: str,
            jitter: str, partial: bool, model: str) -> BenchResult:
    streams = len(sts)
    fps = [(f1 - f0) / wall for f0, f1 in zip(a.frames, b.frames, strict=True)]
    under_by = [u1 - u0 for u0, u1 in zip(a.underruns, b.underruns, strict=True)]
    under = sum(under_by)
    lat = histograms.hist_delta(a.lat, b.lat)
    ticks = histograms.hist_delta(a.ticks, b.ticks)
    p = {q: histograms.quantile(lat, q) * 1000 for q in (0.5, 0.95, 0.99)}
    samples = np.asarray(frames.lateness, dtype=np.float64) * 1000.0
    exact = ({q: float(np.quantile(samples, q)) for q in (0.5, 0.95, 0.99)} if len(samples)
             else dict.fromkeys((0.5, 0.95, 0.99), 0.0))
    # Utterances begun in the measured window, like every other figure: the warm-up's
    # first utterances start all at once on an engine just started (8 of 16 streams
    # within 0.1 s), and their onsets (130-240 ms) made most of p95 in a 20 s run.
    onsets = [s - f for st in sts for f, s in zip(st.fed, st.started, strict=False)
              if a.at <= f < b.at]
    # The stand-in's mouth never moves: there is no lag to measure.
    lag_ms, lag_r, lag_margin = frames.lag() if model != STANDIN else (None, None, None)
    first = [1000.0 * (frames.first_frame[st.session.id] - st.created_at) for st in sts
             if st.session.id in frames.first_frame]
    batch_cum = histograms.hist_delta(a.batch, b.batch)
    hist = histograms.per_bucket(batch_cum)
    stats0, stats1 = a.batcher, b.batcher
    batches = int(stats1.get("batches", 0) - stats0.get("batches", 0))
    batched = stats1.get("batched_requests", 0) - stats0.get("batched_requests", 0)
    misses = int(stats1.get("misses", 0) - stats0.get("misses", 0))
    wait_n = b.wait_count - a.wait_count
    gpu_util, gpu_mem = report.gpu_snapshot()
    fps_min = min(fps) if fps else 0.0
    p99_exact = exact[0.99]
    sink_dropped = sum(b.sink_dropped) - sum(a.sink_dropped)
    enc = [(e1 - e0) / wall for e0, e1 in zip(a.encoded, b.encoded, strict=True)
           if e0 is not None and e1 is not None]
    encoded_fps_min = round(min(enc), 2) if enc else None
    # The controllers' scores at the end of the window, less the share of the window's
    # chunks the encoders dropped (stutter; the sinks' own figure covers only the last
    # second or so, too short for a run).
    shown = sum(f1 - f0 for f0, f1 in zip(a.frames, b.frames, strict=True))
    delivered = 1.0 - sink_dropped / shown if shown else 1.0
    scores = [q.score * delivered for st in sts if isinstance(st.session.sink, Adaptive)
              and (q := st.session.sink.stats().quality) is not None]
    # Real time for an encoder: every picture (or, with --adaptive, at least min_fps).
    encoding_ok = encoded_fps_min is None or \
        encoded_fps_min >= config.min_fps - report.REALTIME_FPS_SLACK
    return BenchResult(
        streams=streams, duration_s=round(wall, 2), speech_duty=duty, sink=sink,
        fps_min=round(fps_min, 2), fps_median=round(float(np.median(fps)) if fps else 0.0, 2),
        lateness_p50_ms=round(p[0.5], 2), lateness_p95_ms=round(p[0.95], 2),
        lateness_p99_ms=round(p[0.99], 2),
        late_frames=int(sum(st.session.counters.late_frames for st in sts)),
        underruns=under, underruns_per_session=round(under / max(streams, 1), 3),
        cpu_percent=round(100.0 * cpu / wall, 1),
        cpu_ms_per_stream_second=round(1000.0 * cpu / wall / max(streams, 1), 3),
        tick_p99_ms=round(histograms.quantile(ticks, 0.99) * 1000, 2),
        realtime=(fps_min >= config.fps - report.REALTIME_FPS_SLACK
                  and p99_exact < report.REALTIME_P99_MS and under == 0 and misses == 0
                  and sink_dropped == 0 and encoding_ok and not partial),
        model=model, backend=config.backend, device=config.device, jitter=jitter,
        max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
        frames_sampled=len(samples),
        lateness_exact_p50_ms=round(exact[0.5], 3),
        lateness_exact_p95_ms=round(exact[0.95], 3),
        lateness_exact_p99_ms=round(p99_exact, 3),
        lateness_exact_max_ms=round(float(samples.max()) if len(samples) else 0.0, 3),
        lipsync_lag_ms=lag_ms, lipsync_corr=lag_r, lipsync_margin=lag_margin,
        stretch=config.jitter_stretch,
        accelerated_ms=round(1000.0 * (b.removed - a.removed) / AUDIO_RATE, 1),
        decelerated_ms=round(1000.0 * (b.inserted - a.inserted) / AUDIO_RATE, 1),
        buffer_delay_ms=(round(1000.0 * (b.delay_ss - a.delay_ss) / (b.emitted - a.emitted),
                               1) if b.emitted > a.emitted else None),
        onsets=len(onsets),
        onset_p50_ms=histograms.ms_quantile(onsets, 0.5),
        onset_p95_ms=histograms.ms_quantile(onsets, 0.95),
        batches=batches, batch_mean=round(batched / batches, 3) if batches else 0.0,
        batch_hist=hist,
        queue_wait_mean_ms=(round(1000.0 * (b.wait_sum - a.wait_sum) / wait_n, 3)
                            if wait_n > 0 else None),
        queue_wait_p95_ms=(round(histograms.quantile(
            histograms.hist_delta(a.wait, b.wait), 0.95) * 1000, 3) if wait_n > 0 else None),
        deadline_misses=misses, underruns_by_session=under_by,
        first_frame_p50_ms=round(float(np.median(first)), 1) if first else None,
        first_frame_max_ms=round(max(first), 1) if first else None,
        gpu_util_percent=gpu_util, gpu_mem_used_mb=gpu_mem, partial=partial,
        sink_dropped=sink_dropped, encoded_fps_min=encoded_fps_min,
        quality_score=round(sum(scores) / len(scores), 3) if scores else None,
        adaptive=config.min_fps < config.fps,
    )


# -- modes ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything a bench invocation measured (also when it was interrupted)."""

    runs: list[BenchResult] = field(default_factory=list)
    capacity: int | None = None
    comparison: dict[str, Any] | None = None
    interrupted: bool = False


def _log_run(r: BenchResult) -> None:
    print(f"  {r.streams:4d} streams: fps_min {r.fps_min:5.2f}  p99 "
          f"{r.lateness_exact_p99_ms:6.1f} ms  misses {r.deadline_misses}  underruns "
          f"{r.underruns}  gc {r.gc_pause_max_ms:.0f} ms  cpu {r.cpu_percent:5.1f}% "
          f"(loop {r.loop_cpu_percent or 0.0:5.1f}%)  -> "
          f"{'real time' if r.realtime else 'MISSED'}", file=sys.stderr, flush=True)


async def _capacity(config: Config, args: argparse.Namespace, outcome: Outcome,
                    progress: report.Progress) -> None:
    """Double until a run misses real time, then bisect between the last good and bad."""

    async def ok(n: int) -> bool:
        r = await run_once(config, n, args.duration, args.warmup, args.speech, args.sink,
                           jitter=args.jitter, progress=progress, out=outcome.runs,
                           standin=_standin(args))
        await _pause_progress(progress)
        _log_run(r)
        return r.realtime

    lo, hi = 0, 0
    n = max(1, args.streams)
    while n <= args.max_streams_search and await ok(n):
        lo, n = n, n * 2
        outcome.capacity = lo
    hi = min(n, args.max_streams_search + 1)
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if await ok(mid):
            lo = mid
            outcome.capacity = lo
        else:
            hi = mid
    outcome.capacity = lo


def _standin(args: argparse.Namespace) -> StandinModel | None:
    return StandinModel(args.standin_latency_ms) if args.model == STANDIN else None


async def _pause_progress(progress: report.Progress) -> None:
    """End the bar's line before a log line; it starts again on the next run."""
    await progress.stop()
    progress.start()


async def _main(config: Config, args: argparse.Namespace, outcome: Outcome) -> None:
    length = args.warmup + args.duration
    progress = report.Progress(
        enabled=args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()
                                          and (length >= 5 or args.capacity or args.compare)))
    progress.start()
    try:
        if args.capacity:
            await _capacity(config, args, outcome, progress)
        elif args.compare == "batching":
            batched = await run_once(config, args.streams, args.duration, args.warmup,
                                     args.speech, args.sink, jitter=args.jitter,
                                     progress=progress, out=outcome.runs,
                                     standin=_standin(args))
            unbatched = await run_once(_run_config(config, 1), args.streams, args.duration,
                                       args.warmup, args.speech, args.sink,
                                       jitter=args.jitter, progress=progress,
                                       out=outcome.runs, standin=_standin(args))
            outcome.comparison = report.comparison_json(batched.json(), unbatched.json())
        elif args.compare == "stretch":
            # The same streams and arrivals, stretching off then on: the rows side by side.
            for on in (False, True):
                await run_once(dataclasses.replace(config, jitter_stretch=on), args.streams,
                               args.duration, args.warmup, args.speech, args.sink,
                               jitter=args.jitter, progress=progress, out=outcome.runs)
        else:
            await run_once(config, args.streams, args.duration, args.warmup, args.speech,
                           args.sink, jitter=args.jitter, progress=progress,
                           out=outcome.runs, standin=_standin(args),
                           profile=Path(args.profile) if args.profile else None)
    finally:
        await progress.stop()


def bench_main(config: Config, args: argparse.Namespace) -> int:
    problem = validate(args)  # the CLI checked already; callers from Python may not
    if problem is None and args.http:
        problem = "--http runs in rapido.bench.http.http_main, not in-process"
    if problem:
        print(f"rapido: bench: {problem}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before measuring, not after)
        except ImportError:
            print("rapido: bench: --plot needs matplotlib: pip install matplotlib "
                  "(or the bench extra)", file=sys.stderr)
            return 2
    # Encoders run whether or not anybody watches (the bench has no viewers), and the
    # frame rate stays at its ceiling unless --adaptive lets it fall.
    config = dataclasses.replace(
        config, webrtc_warm_encoders=config.webrtc_warm_encoders or args.sink == "webrtc",
        min_fps=config.min_fps if getattr(args, "adaptive", False) else float(config.fps))
    outcome = Outcome()
    try:
        asyncio.run(_main(config, args, outcome))
    except (KeyboardInterrupt, asyncio.CancelledError):
        outcome.interrupted = True
        print("rapido: bench: interrupted; what was measured so far:", file=sys.stderr)
    return emit(config, args, outcome)


def emit(config: Config, args: argparse.Namespace, outcome: Outcome) -> int:
    rows = [r.json() for r in outcome.runs]
    machine = report.machine_info()
    cost: dict[str, Any] | None = None
    if args.gpu_cost_per_hour is not None:
        if outcome.capacity is not None:
            cost = report.cost_json(args.gpu_cost_per_hour, outcome.capacity, "capacity search")
        else:
            good = [r.streams for r in outcome.runs if r.realtime]
            cost = report.cost_json(args.gpu_cost_per_hour, max(good, default=0),
                                    "single run (a lower bound; use --capacity)")
    plot_path = None
    if args.plot and rows:
        model = (f"standin ({args.standin_latency_ms:g} ms a batch)" if args.model == STANDIN
                 else config.model)
        sub = (f"model {model}, max_batch {config.max_batch}, speech {args.speech}, "
               f"jitter {args.jitter}, sink {args.sink}")
        plot_path = str(report.plot(rows, args.plot, fps=config.fps, machine=machine,
                                    subtitle=sub))
    profile: dict[str, str] | None = None
    stacks = Path(args.profile) if args.profile else None
    if stacks is not None and stacks.exists() and stacks.stat().st_size:
        svg = flame_svg(stacks.read_text(), stacks.with_name(stacks.name + ".svg"),
                        title=f"GIL held: rapido bench, {args.streams} streams, model "
                              f"{args.model or config.model}")
        profile = {"stacks": str(stacks), "flame_graph": str(svg)}
    if args.json:
        doc: dict[str, Any] = {
            "profile": profile,
            "runs": rows, "capacity": outcome.capacity, "comparison": outcome.comparison,
            "cost": cost, "machine": machine, "plot": plot_path,
            "interrupted": outcome.interrupted,
        }
        print(json.dumps(doc, indent=2))
    else:
        report.print_table(rows)
        if outcome.capacity is not None:
            print(f"capacity: {outcome.capacity} real-time streams (speech duty "
                  f"{args.speech}, jitter {args.jitter}, sink {args.sink}, "
                  f"{machine['cores']} cores)")
        if outcome.comparison is not None:
            print(report.comparison_line(outcome.comparison))
        if cost is not None:
            print(report.cost_line(cost))
        if plot_path:
            print(f"plot: {plot_path}")
        for r in outcome.runs:
            if r.gil_stages is not None:
                print(table_text([GilRow(**g) for g in r.gil_stages]))
        if profile is not None:
            print(f"profile: {profile['stacks']} (collapsed stacks), "
                  f"{profile['flame_graph']} (flame graph)")
    return 130 if outcome.interrupted else 0
