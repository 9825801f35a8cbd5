"""``rapido bench --http URL``: drive a running server over real sockets.

Sessions are created with ``POST /api/sessions``, speech is streamed over
``/ws/sessions/{id}`` following the same jitter traces as the in-process bench, streams
are started over ``--ramp`` seconds and held for ``--duration``, and the sessions are
deleted at the end. Everything is measured from the client side: speech onset (first
chunk sent -> ``playback_started`` received), ``underrun`` events, delivered fps from the
session's ``frames_out`` (``GET /api/sessions/{id}``), and errors. With ``--viewers K``
(and ``--sink webrtc``) the first K sessions are also watched by a real WHEP viewer
(:mod:`rapido.bench.viewer`): speech to first audible audio where a listener is.

Bounded: at most :data:`MAX_HTTP_STREAMS` streams, and the whole run is cut off at
ramp + warmup + duration + :data:`GRACE_S`. Loopback only unless ``--allow-remote``
(checked by :func:`rapido.bench.args.check_url`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from rapido.aio import cancel_and_wait
from rapido.bench import report
from rapido.bench.run import INPUT_RATE, stream_trace
from rapido.bench.viewer import WhepViewer, first_audible, viewer_onsets
from rapido.config import Config
from rapido.heap import GcPauses, freeze_heap
from rapido.pipeline.speech import speech_like

MAX_HTTP_STREAMS = 256
GRACE_S = 30.0
REQUEST_TIMEOUT_S = 10.0


@dataclass
class _Client:
    index: int
    session_id: str = ""
    created_at: float = 0.0  # loop time the create answered
    first_event_at: float | None = None  # the WebSocket's "ready"
    fed: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    finished: int = 0
    underruns: int = 0
    errors: list[str] = field(default_factory=list)
    frames0: int | None = None
    frames1: int | None = None
    t_frames0: float = 0.0
    t_frames1: float = 0.0
    final_stats: dict[str, Any] = field(default_factory=dict)
    #: --viewers: per utterance, when the chunk holding its first audible sample left
    #: and that sample's offset into the chunk (s); and what the viewer heard.
    audible_sent: list[tuple[float, float]] = field(default_factory=list)
    #: How late each send left against its trace (s): this client shares the machine
    #: with the node, and speech it sends late underruns at the node for the client's
    #: sake, not the node's.
    send_late: list[float] = field(default_factory=list)
    viewer: WhepViewer | None = None


class _Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base.rstrip("/")

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        # A node without an api_key takes JSON only as application/json (said outright
        # here, not left to the client library's default).
        headers = {"Content-Type": "application/json"} if body is not None else None
        async with self.http.request(method, self.base + path, json=body,
                                     headers=headers) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status} {data}")
            return dict(data)


async def _stream(api: _Api, c: _Client, args: argparse.Namespace, start_at: float,
                  hold_from: float, end_at: float) -> None:
    loop = asyncio.get_running_loop()
    delay = start_at - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {"lesson_id": f"bench-{os.getpid()}-{c.index}", "sample_rate": INPUT_RATE,
            "sink": args.sink}
    created = await api.call("POST", "/api/sessions", body)
    c.session_id = created["session_id"]
    c.created_at = loop.time()
    ws_url = api.base.replace("http", "ws", 1) + f"/ws/sessions/{c.session_id}"
    try:
        if c.index < args.viewers:
            # Connected and hearing (silence) before the first utterance is sent, so
            # its onset is not the connection's set-up.
            c.viewer = WhepViewer(api.http, created["whep_url"], created["viewer_token"])
            await c.viewer.connect()
        async with api.http.ws_connect(ws_url, heartbeat=30.0) as ws:
            reader = loop.create_task(_read_events(ws, c), name=f"ws-read-{c.index}")
            sampler = loop.create_task(_sample_frames(api, c, hold_from, end_at))
            try:
                trace = stream_trace(args.jitter, args.speech, end_at - loop.time() + 1.0,
                                     seed=c.index)
                await _send(ws, c, trace, loop.time(), end_at)
                await sampler
            finally:
                sampler.cancel()
                reader.cancel()
                await asyncio.gather(sampler, reader, return_exceptions=True)
    finally:
        try:
            c.final_stats = dict((await api.call(
                "DELETE", f"/api/sessions/{c.session_id}")).get("stats") or {})
        except Exception as exc:  # the server may be gone; count it, keep the rest
            c.errors.append(f"delete: {exc}")
        if c.viewer is not None:
            await c.viewer.aclose()


async def _send(ws: aiohttp.ClientWebSocketResponse, c: _Client, trace: list[Any],
                t0: float, end_at: float) -> None:
    loop = asyncio.get_running_loop()
    audio = speech_like(3.5, seed=c.index)
    lead = first_audible(audio)
    pos = 0
    heard_from = False  # this utterance's first audible sample has been sent
    open_utt = False
    for a in trace:
        at = t0 + a.t
        if at >= end_at:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        c.send_late.append(max(0.0, loop.time() - at))
        if a.end:
            if open_utt:
                await ws.send_str(json.dumps({"type": "end"}))
                open_utt = False
            continue
        if not open_utt:
            await ws.send_str(json.dumps({"type": "start"}))
            c.fed.append(loop.time())
            open_utt, pos, heard_from = True, 0, False
        if lead is not None and not heard_from and pos <= lead < pos + a.samples:
            c.audible_sent.append((loop.time(), (lead - pos) / INPUT_RATE))
            heard_from = True
        chunk = np.resize(audio[pos:], a.samples).astype("<i2")
        await ws.send_bytes(chunk.tobytes())
        pos = (pos + a.samples) % len(audio)
    if open_utt:
        await ws.send_str(json.dumps({"type": "end"}))
    delay = end_at - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _read_events(ws: aiohttp.ClientWebSocketResponse, c: _Client) -> None:
    loop = asyncio.get_running_loop()
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        ev = json.loads(msg.data)
        kind = ev.get("type")
        if kind == "ready" and c.first_event_at is None:
            c.first_event_at = loop.time()
        elif kind == "playback_started":
            c.started.append(loop.time())
        elif kind == "playback_finished":
            c.finished += 1
        elif kind == "underrun":
            c.underruns += 1
        elif kind == "error":
            c.errors.append(f"ws error event: {ev.get('code')}: {ev.get('message')}")


async def _sample_frames(api: _Api, c: _Client, hold_from: float, end_at: float) -> None:
    """frames_out at the start and the end of the hold window (delivered fps)."""
    loop = asyncio.get_running_loop()
    for when, first in ((hold_from, True), (end_at - 0.05, False)):
        delay = when - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        stats = (await api.call("GET", f"/api/sessions/{c.session_id}")).get("stats") or {}
        now = loop.time()
        if first:
            c.frames0, c.t_frames0 = int(stats.get("frames_out", 0)), now
        else:
            c.frames1, c.t_frames1 = int(stats.get("frames_out", 0)), now


def _summary(clients: list[_Client], args: argparse.Namespace, fps_target: int,
             wall: float, interrupted: bool, pauses: GcPauses | None = None
             ) -> dict[str, Any]:
    fps = [(c.frames1 - c.frames0) / (c.t_frames1 - c.t_frames0) for c in clients
           if c.frames0 is not None and c.frames1 is not None and c.t_frames1 > c.t_frames0]
    onsets = [s - f for c in clients for f, s in zip(c.fed, c.started, strict=False)]
    errors = [e for c in clients for e in c.errors]
    under = [c.underruns for c in clients]
    late = [x for c in clients for x in c.send_late]
    heard: list[float] = []
    arrived: list[float] = []
    missed = 0
    for c in clients:
        if c.viewer is not None:
            # Utterances sent in the last second may not have played when the run ended.
            got, lost = viewer_onsets(c.audible_sent, c.viewer.heard, c.t_frames1 - 1.0)
            heard += got
            missed += lost
            arrived += viewer_onsets(c.audible_sent, c.viewer.heard, c.t_frames1 - 1.0,
                                     by_arrival=True)[0]

    def q(values: list[float], p: float) -> float | None:
        return round(1000.0 * float(np.quantile(values, p)), 2) if values else None

    fps_min = round(min(fps), 2) if fps else 0.0
    return {
        "mode": "http",
        "url": args.http,
        "streams": args.streams,
        "sessions_created": sum(1 for c in clients if c.session_id),
        "ramp_s": args.ramp,
        "duration_s": args.duration,
        "wall_s": round(wall, 2),
        "speech_duty": args.speech,
        "jitter": args.jitter,
        "sink": args.sink,
        "fps_min": fps_min,
        "fps_median": round(float(np.median(fps)), 2) if fps else 0.0,
        "fps_by_session": [round(f, 2) for f in fps],
        "onsets": len(onsets),
        "onset_p50_ms": q(onsets, 0.5),
        "onset_p95_ms": q(onsets, 0.95),
        "viewers": args.viewers,
        "viewer_onsets": len(heard),
        "viewer_onsets_missed": missed,
        "viewer_onset_p50_ms": q(heard, 0.5),
        "viewer_onset_p95_ms": q(heard, 0.95),
        # The same, by when the packets reached the viewer: before aiortc's jitter buffer.
        "viewer_arrival_onset_p50_ms": q(arrived, 0.5),
        "viewer_arrival_onset_p95_ms": q(arrived, 0.95),
        "playback_started": sum(len(c.started) for c in clients),
        "playback_finished": sum(c.finished for c in clients),
        "client_send_late_p99_ms": q(late, 0.99),
        "client_send_late_max_ms": round(1000.0 * max(late), 1) if late else None,
        # Sends more than a 40 ms chunk late: each can drain a buffer that started at
        # 96 ms, whatever the node does.
        "client_sends_late_40ms": sum(x > 0.04 for x in late),
        # The client's own collector: a full collection stops every send at once (91 ms
        # measured here without the freeze, one underrun in most of 48 sessions).
        "client_gc_pause_max_ms": round(pauses.longest_s * 1e3, 1) if pauses else None,
        "client_gc_full_collections": pauses.count[2] if pauses else None,
        "underruns": sum(under),
        "underruns_by_session": under,
        "underruns_per_session": round(sum(under) / max(len(clients), 1), 3),
        "server_underruns_by_session": [c.final_stats.get("underruns") for c in clients],
        "errors": len(errors),
        "error_samples": errors[:10],
        "realtime": bool(fps) and fps_min >= fps_target - report.REALTIME_FPS_SLACK
        and sum(under) == 0 and not errors and not interrupted,
        "interrupted": interrupted,
    }


async def run_http(config: Config, args: argparse.Namespace, clients: list[_Client]) -> float:
    loop = asyncio.get_running_loop()
    if config.gc_freeze:
        # The client stands in for a speech source in a process of its own: its collector
        # must not stall every stream's sends at once, as a full collection of this
        # process (aiortc, PyAV, numpy imported: ~90 ms) did. Frozen before anything is
        # timed, and again once the sessions and viewers are set up (see _freeze_later).
        freeze_heap()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT_S,
                                    sock_read=REQUEST_TIMEOUT_S + args.duration + args.ramp)
    t_start = loop.time()
    ramp = args.ramp
    hold_from = t_start + ramp + args.warmup
    end_at = hold_from + args.duration
    progress = report.Progress(enabled=args.progress == "on"
                               or (args.progress == "auto" and sys.stderr.isatty()))
    progress.phase(f"{args.streams} streams over HTTP", end_at - t_start)
    progress.start()
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            api = _Api(http, args.http)
            for i in range(args.streams):
                clients.append(_Client(i))
            tasks = [
                loop.create_task(_stream(api, c, args, t_start + ramp * i / args.streams,
                                         hold_from, end_at))
                for i, c in enumerate(clients)
            ]
            freezer = (loop.create_task(_freeze_later(hold_from), name="gc-freeze")
                       if config.gc_freeze else None)
            try:
                done = await asyncio.wait_for(
                    asyncio.gather(*tasks, return_exceptions=True),
                    end_at - loop.time() + GRACE_S)
            finally:
                await cancel_and_wait([*tasks, freezer])
            for c, res in zip(clients, done, strict=True):
                if isinstance(res, BaseException):
                    c.errors.append(f"{type(res).__name__}: {res}")
    finally:
        await progress.stop()
    return loop.time() - t_start


async def _freeze_later(at: float) -> None:
    """At the measured window's start, freeze what setting up the sessions and viewers
    made: without a collection first (that would be the very pause avoided), so any
    garbage among it stays; this process ends with the run."""
    delay = at - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)
    gc.freeze()


def http_main(config: Config, args: argparse.Namespace) -> int:
    if args.streams > MAX_HTTP_STREAMS:
        print(f"rapido: bench: --http drives at most {MAX_HTTP_STREAMS} streams",
              file=sys.stderr)
        return 2
    clients: list[_Client] = []
    interrupted = False
    t0 = time.monotonic()
    pauses = GcPauses().install()
    try:
        wall = asyncio.run(run_http(config, args, clients))
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
        wall = time.monotonic() - t0
        print("rapido: bench: interrupted; what was measured so far:", file=sys.stderr)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"rapido: bench: --http {args.http}: {exc}", file=sys.stderr)
        return 1
    finally:
        pauses.close()
    summary = _summary(clients, args, config.fps, wall, interrupted, pauses)
    cost = None
    if args.gpu_cost_per_hour is not None:
        cost = report.cost_json(args.gpu_cost_per_hour,
                                args.streams if summary["realtime"] else 0,
                                "http run (a lower bound)")
    if args.json:
        print(json.dumps({"runs": [summary], "capacity": None, "comparison": None,
                          "cost": cost, "machine": report.machine_info(), "plot": None,
                          "interrupted": interrupted}, indent=2))
    else:
        report.print_table([summary], columns=(
            "streams", "sessions_created", "jitter", "speech_duty", "fps_min", "fps_median",
            "onset_p50_ms", "onset_p95_ms",
            *(("viewer_onset_p50_ms", "viewer_onset_p95_ms", "viewer_arrival_onset_p50_ms",
               "viewer_arrival_onset_p95_ms", "viewer_onsets_missed")
              if args.viewers else ()),
            "underruns", "errors", "realtime"))
        for e in summary["error_samples"]:
            print(f"  error: {e}")
        if cost is not None:
            print(report.cost_line(cost))
    return 130 if interrupted else 0
