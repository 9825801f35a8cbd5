"""``rapido bench``: N synthetic streams through the real engine, in this process.

Each stream gets speech the way a TTS over a WebSocket would deliver it: 20 ms chunks at
real time, utterances of a few seconds separated by pauses according to the duty cycle.
The engine, jitter buffers, resampling and sinks are the real ones; only the sockets are
left out (``--http`` against a running server comes with the bench issue).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import resource
import sys
import time

import numpy as np

from rapido.config import Config
from rapido.engine import Engine
from rapido.metrics import Metrics
from rapido.pipeline.session import SessionSpec, StreamSession

INPUT_RATE = 16_000
CHUNK_S = 0.02
UTTERANCE_S = 3.0


def speech_like(seconds: float, rate: int = INPUT_RATE, seed: int = 0) -> np.ndarray:
    """Syllable-rate amplitude-modulated harmonics: speech-like energy and spectrum."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    noise = rng.normal(0, 0.05, len(t))
    x = (voice * 0.25 + noise) * envelope
    return (np.clip(x, -1, 1) * 20000).astype(np.int16)


@dataclasses.dataclass
class BenchResult:
    streams: int
    duration_s: float
    speech_duty: float
    sink: str
    fps_min: float
    fps_median: float
    lateness_p50_ms: float
    lateness_p95_ms: float
    lateness_p99_ms: float
    late_frames: int
    underruns: int
    underruns_per_session: float
    cpu_percent: float
    cpu_ms_per_stream_second: float
    tick_p99_ms: float
    realtime: bool


async def _drive(session: StreamSession, duty: float, stop: asyncio.Event, seed: int) -> None:
    """Feed one stream at real time: speech for UTTERANCE_S, then a pause for the duty."""
    loop = asyncio.get_running_loop()
    audio = speech_like(UTTERANCE_S, seed=seed)
    chunk = int(INPUT_RATE * CHUNK_S)
    pause = UTTERANCE_S * (1.0 - duty) / duty if duty > 0 else float("inf")
    await asyncio.sleep((seed % 25) * 0.04 * 0.37)  # spread the streams' phases
    while not stop.is_set():
        if duty <= 0:
            await stop.wait()
            return
        session.start_utterance()
        t0 = loop.time()
        for i, start in enumerate(range(0, len(audio), chunk)):
            if stop.is_set():
                return
            await session.feed(audio[start : start + chunk])
            delay = t0 + (i + 1) * CHUNK_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await session.end_utterance()
        if pause > 0:
            try:
                await asyncio.wait_for(stop.wait(), pause)
            except TimeoutError:
                pass


async def run_once(config: Config, streams: int, duration: float, warmup: float,
                   duty: float, sink: str) -> BenchResult:
    metrics = Metrics()
    engine = Engine(dataclasses.replace(config, max_streams=max(streams, 1)), metrics)
    await engine.start()
    stop = asyncio.Event()
    drivers: list[asyncio.Task[None]] = []
    try:
        sessions = []
        for i in range(streams):
            s, _ = await engine.create_session(
                SessionSpec(lesson_id=f"bench{i}", sample_rate=INPUT_RATE, sink=sink))
            sessions.append(s)
            drivers.append(asyncio.create_task(_drive(s, duty, stop, i), name=f"drive-{i}"))
        await asyncio.sleep(warmup)
        frames0 = [s.counters.frames_out for s in sessions]
        under0 = sum(s.jb.stats.underruns for s in sessions)
        lat_hist0 = _hist_snapshot(metrics)
        tick_hist0 = _hist_snapshot(metrics, "clock_tick_seconds")
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.sleep(duration)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        wall = t1 - t0
        fps = [(s.counters.frames_out - f0) / wall for s, f0 in zip(sessions, frames0,
                                                                     strict=True)]
        under = sum(s.jb.stats.underruns for s in sessions) - under0
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        lat = _hist_delta(lat_hist0, _hist_snapshot(metrics))
        ticks = _hist_delta(tick_hist0, _hist_snapshot(metrics, "clock_tick_seconds"))
        late = int(sum(s.counters.late_frames for s in sessions))
    finally:
        stop.set()
        for t in drivers:
            t.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        await engine.aclose()
    p = {q: _quantile(lat, q) * 1000 for q in (0.5, 0.95, 0.99)}
    fps_min = min(fps) if fps else 0.0
    fps_target = config.fps
    return BenchResult(
        streams=streams, duration_s=round(wall, 2), speech_duty=duty, sink=sink,
        fps_min=round(fps_min, 2), fps_median=round(float(np.median(fps)) if fps else 0.0, 2),
        lateness_p50_ms=round(p[0.5], 2), lateness_p95_ms=round(p[0.95], 2),
        lateness_p99_ms=round(p[0.99], 2), late_frames=late, underruns=under,
        underruns_per_session=round(under / max(streams, 1), 3),
        cpu_percent=round(100.0 * cpu / wall, 1),
        cpu_ms_per_stream_second=round(1000.0 * cpu / wall / max(streams, 1), 3),
        tick_p99_ms=round(_quantile(ticks, 0.99) * 1000, 2),
        realtime=(fps_min >= fps_target - 0.5 and p[0.99] < 40.0 and under == 0),
    )


def _hist_snapshot(metrics: Metrics, name: str = "frame_processing_latency_seconds"
                   ) -> dict[float, float]:
    out: dict[float, float] = {}
    for family in metrics.registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out[float(sample.labels["le"])] = sample.value
    return out


def _hist_delta(a: dict[float, float], b: dict[float, float]) -> dict[float, float]:
    return {k: b[k] - a.get(k, 0.0) for k in b}


def _quantile(cumulative: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile q (Prometheus-style, conservative)."""
    if not cumulative:
        return 0.0
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    if total <= 0:
        return 0.0
    for le in bounds:
        if cumulative[le] >= q * total:
            return le if le != float("inf") else bounds[-2]
    return bounds[-2]


def _print_table(results: list[BenchResult]) -> None:
    cols = ["streams", "speech_duty", "sink", "fps_min", "fps_median", "lateness_p50_ms",
            "lateness_p99_ms", "underruns", "cpu_percent", "cpu_ms_per_stream_second",
            "realtime"]
    rows = [[str(getattr(r, c)) for c in cols] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


async def _capacity(config: Config, args: argparse.Namespace) -> list[BenchResult]:
    """Double until a run misses real time, then bisect between the last good and bad."""
    results: list[BenchResult] = []

    async def ok(n: int) -> bool:
        r = await run_once(config, n, args.duration, args.warmup, args.speech, args.sink)
        results.append(r)
        print(f"  {n:4d} streams: fps_min {r.fps_min:5.2f}  p99 {r.lateness_p99_ms:6.1f} ms"
              f"  underruns {r.underruns}  cpu {r.cpu_percent:5.1f}%  -> "
              f"{'real time' if r.realtime else 'MISSED'}", file=sys.stderr, flush=True)
        return r.realtime

    lo, hi = 0, 0
    n = max(1, args.streams)
    while n <= args.max_streams_search and await ok(n):
        lo, n = n, n * 2
    hi = min(n, args.max_streams_search + 1)
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        if await ok(mid):
            lo = mid
        else:
            hi = mid
    print(f"capacity: {lo} real-time streams (speech duty {args.speech}, sink {args.sink}, "
          f"{os.cpu_count()} cores)", file=sys.stderr)
    return results


def bench_main(config: Config, args: argparse.Namespace) -> int:
    if not 0.0 <= args.speech <= 1.0:
        print("rapido: bench: --speech must be within 0..1", file=sys.stderr)
        return 2
    if args.streams < 1 or args.duration <= 0:
        print("rapido: bench: --streams must be >= 1 and --duration > 0", file=sys.stderr)
        return 2
    if args.capacity:
        results = asyncio.run(_capacity(config, args))
    else:
        results = [asyncio.run(run_once(config, args.streams, args.duration, args.warmup,
                                        args.speech, args.sink))]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    else:
        _print_table(results)
    return 0

