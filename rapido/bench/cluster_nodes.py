"""``rapido bench cluster --nodes M``: M real rapido nodes (``serve --model none``,
:mod:`rapido.bench.nodes`) joined in a network namespace of their own
(:mod:`rapido.bench.netns`), in phases, each a function ``async def phase_x(run) -> dict``:

* ``proxy_rest``: REST to a session's owner and through another node: the relay's cost;
* ``proxy_ws``: speaking streams to the owner and through a relay: underruns, late frames;
* ``media_load``: every node at full media load with 10 % UDP loss on gossip: no member
  ever seen not alive, the streams unharmed;
* ``scale``: a load ramp: every node's scale signals (``cluster_recommended_nodes``);
* ``node_kill``: kill -9 of a lesson's owner: failed everywhere, then the lesson again.

The agents-only phases (``bench cluster --agents``) are in :mod:`rapido.bench.cluster`,
which dispatches here. Why one module over 500 lines: the phases share one run object
(nodes, sessions, the namespace's firewall) and its small helpers; split per phase they
would import each other's helpers back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from rapido.aio import cancel_and_wait
from rapido.bench import report
from rapido.bench.args import NODE_PHASE_NAMES
from rapido.bench.fleet import cpu_seconds
from rapido.bench.netns import Firewall, NetnsError, run_in_netns
from rapido.bench.nodes import Node, NodeFleet, create, lists_all, members, until
from rapido.pipeline.speech import speech_like

#: The targets the issue sets for rapido nodes.
NODE_TARGETS: dict[str, tuple[str, float]] = {
    "again_s": ("≤ 15 s", 15.0),
    "rest_added_p50_ms": ("≤ 2 ms", 2.0),
    "ws_added_underruns": ("0", 0.0),
    "load_not_alive": ("0", 0.0),
}

NODE_ROWS: tuple[tuple[str, str], ...] = (
    ("start_s", "start M nodes (until each answers), s"),
    ("converged_s", "all list all alive, s"),
    ("rest_direct_p50_ms", "GET /api/sessions/{id} to the owner, p50 ms"),
    ("rest_direct_p99_ms", "  same, p99 ms"),
    ("rest_relayed_p50_ms", "  through another node (relayed), p50 ms"),
    ("rest_relayed_p99_ms", "  same, p99 ms"),
    ("rest_added_p50_ms", "  added by the relay, p50 ms"),
    ("rest_added_p99_ms", "  added by the relay, p99 ms"),
    ("ws_direct_underruns", "streams to the owner: underruns (all sessions)"),
    ("ws_direct_late_frames", "  late frames"),
    ("ws_direct_frames_out", "  frames out"),
    ("ws_direct_send_lag_p99_ms", "  the client's send lag (chunk sent after due), p99 ms"),
    ("ws_direct_send_lag_max_ms", "  same, worst, ms"),
    ("ws_direct_owner_cpu_pct", "  owner's CPU, % of a core"),
    ("ws_relayed_underruns", "streams through a relay: underruns"),
    ("ws_relayed_late_frames", "  late frames"),
    ("ws_relayed_frames_out", "  frames out"),
    ("ws_relayed_send_lag_p99_ms", "  the client's send lag, p99 ms"),
    ("ws_relayed_send_lag_max_ms", "  same, worst, ms"),
    ("ws_relayed_owner_cpu_pct", "  owner's CPU, % of a core"),
    ("ws_relayed_relay_cpu_pct", "  relay's CPU, % of a core"),
    ("ws_added_underruns", "underruns added by the relay"),
    ("ws_added_late_frames", "late frames added by the relay"),
    ("load_streams_per_node", "full media load: streams per node (record sink)"),
    ("load_machine_busy_pct", "  machine busy while watched, % of all cores"),
    ("load_load1_min", "  load average (1 min) while watched, lowest"),
    ("load_load1_max", "  same, highest"),
    ("load_node_cpu_min_pct", "  a node process's CPU, least busy, % of a core"),
    ("load_node_cpu_max_pct", "  same, busiest, % of a core"),
    ("load_driver_cpu_pct", "  the bench driver's CPU, % of a core"),
    ("load_dropped", "  10 % UDP loss on gossip: packets dropped"),
    ("load_reads", "  member views read (every node every 0.5 s)"),
    ("load_unreadable", "  of which unanswered (3 s)"),
    ("load_not_alive", "  not-alive observations"),
    ("load_underruns", "  the sessions' underruns (all, whole phase)"),
    ("load_late_frames", "  late frames"),
    ("load_frames_out", "  frames out"),
    ("load_send_lag_p99_ms", "  the client's send lag, p99 ms"),
    ("scale_recommended_first", "scale signals: cluster_recommended_nodes idle"),
    ("scale_recommended_last", "  at the top of the load ramp"),
    ("scale_agree", "  the same on every node at every step"),
    ("failed_s", "kill -9 of a lesson's owner: all survivors list it failed, s"),
    ("again_s", "  the lesson answered again by every survivor, one session, s"),
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` (0..100) percentile of ``values``, linear between the closest ranks
    (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q!r} is not in 0..100")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def latency_summary(direct_s: Sequence[float], relayed_s: Sequence[float]
                    ) -> dict[str, float | None]:
    """p50/p99 in ms of both paths and what the relay added (relayed - direct)."""
    out: dict[str, float | None] = {}
    for q in (50, 99):
        d, r = percentile(direct_s, q), percentile(relayed_s, q)
        out[f"rest_direct_p{q}_ms"] = None if d is None else 1000 * d
        out[f"rest_relayed_p{q}_ms"] = None if r is None else 1000 * r
        out[f"rest_added_p{q}_ms"] = None if d is None or r is None else 1000 * (r - d)
    return out


def stream_totals(stats: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Sessions' ``stats`` summed: underruns, late frames, frames out, utterances."""
    keys = ("underruns", "late_frames", "frames_out", "utterances")
    return {k: sum(int(s.get(k, 0)) for s in stats) for k in keys}


@dataclass(frozen=True)
class NodeParams:
    nodes: int = 3
    rest_requests: int = 300
    streams: int = 32
    stream_s: float = 10.0
    #: media_load: seconds watched under loss at full load (0: the phase is skipped).
    load_s: float = 60.0
    load_step: int = 2
    load_max_per_node: int = 24
    load_sink: str = "record"
    load_loss_percent: float = 10.0
    #: scale: streams added per node per step, the most per node, the wait per step.
    scale_step: int = 2
    scale_max_per_node: int = 12
    scale_settle_s: float = 8.0
    #: Each node's max_streams when scale is the only phase: small enough that streams,
    #: not only CPU, move the recommendation within the ramp.
    scale_capacity: int = 16
    phases: tuple[str, ...] = ()  # empty: all, in order


@dataclass
class NodeRun:
    params: NodeParams
    firewall: Firewall
    fleet: NodeFleet
    http: aiohttp.ClientSession
    results: dict[str, Any] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(f"[{self.params.nodes} nodes] {text}", file=sys.stderr, flush=True)

    @property
    def nodes(self) -> list[Node]:
        return self.fleet.live()

    def node(self, node_id: str) -> Node:
        return next(n for n in self.fleet.nodes if n.node_id == node_id)


async def _created(run: NodeRun, front: Node, lesson: str, here: bool = False
                   ) -> dict[str, Any]:
    headers = {"X-Rapido-Route": "here"} if here else None
    status, body = await create(run.http, front, lesson, headers=headers)
    if status != 201:
        raise RuntimeError(f"create {lesson} through {front.node_id}: {status} {body}")
    return body


async def phase_proxy_rest(run: NodeRun) -> dict[str, Any]:
    """``GET /api/sessions/{id}`` straight to the owner and through another node, one
    after the other in turn (which goes first alternates), keep-alive connections."""
    n = run.params.rest_requests
    body = await _created(run, run.nodes[0], "bench-rest")
    owner = run.node(body["node"])
    relay = next(x for x in run.nodes if x is not owner)
    run.say(f"proxy rest: {n} GETs straight to {owner.node_id} and {n} through "
            f"{relay.node_id}, interleaved")
    path = f"/api/sessions/{body['session_id']}"
    times: dict[str, list[float]] = {"direct": [], "relayed": []}
    failures = 0

    async def get(url: str) -> float:
        nonlocal failures
        t0 = time.perf_counter()
        async with run.http.get(url) as r:
            await r.read()
            if r.status != 200:
                failures += 1
        return time.perf_counter() - t0

    urls = {"direct": owner.url + path, "relayed": relay.url + path}
    for _ in range(20):  # warm: connections open, the relay's own pool too
        for url in urls.values():
            await get(url)
    for i in range(n):
        order = ("direct", "relayed") if i % 2 == 0 else ("relayed", "direct")
        for kind in order:
            times[kind].append(await get(urls[kind]))
    out: dict[str, Any] = {"rest_owner": owner.node_id, "rest_relay": relay.node_id,
                           "rest_requests": n, "rest_failures": failures}
    out.update(latency_summary(times["direct"], times["relayed"]))
    return out


async def _stream(run: NodeRun, ws_url: str, seed: int, seconds: float,
                  lag: list[float]) -> None:
    """One honest speaker: 16 kHz PCM in real time, 20 ms chunks, utterances of 1.5-3 s
    with 0.3-0.8 s pauses (``start``/``end`` around each), for ``seconds``."""
    rng = random.Random(seed)
    chunk = 320  # 20 ms at 16 kHz
    loop = asyncio.get_running_loop()
    async with run.http.ws_connect(ws_url) as ws:
        ready = await ws.receive_json(timeout=15)
        if ready.get("type") != "ready":
            raise RuntimeError(f"not ready: {ready}")
        await asyncio.sleep(rng.uniform(0, 0.5))  # the streams do not tick together
        t = t_start = loop.time()
        while loop.time() - t_start < seconds:
            audio = speech_like(rng.uniform(1.5, 3.0), seed=rng.randrange(1 << 30))
            await ws.send_json({"type": "start"})
            for i in range(0, len(audio), chunk):
                lag.append(max(0.0, loop.time() - t))  # this chunk was due at t
                await ws.send_bytes(audio[i:i + chunk].astype("<i2").tobytes())
                t += 0.02
                await asyncio.sleep(max(0.0, t - loop.time()))
            await ws.send_json({"type": "end"})
            t += rng.uniform(0.3, 0.8)
            await asyncio.sleep(max(0.0, t - loop.time()))
        await asyncio.sleep(2.0)  # the last utterance plays out


async def _stream_run(run: NodeRun, owner: Node, relay: Node | None, tag: str
                      ) -> dict[str, Any]:
    p = run.params
    sessions = [await _created(run, owner, f"bench-ws-{tag}-{i}", here=True)
                for i in range(p.streams)]
    urls = [s["ws_url"] for s in sessions]
    if relay is not None:
        urls = [u.replace(f"127.0.0.1:{owner.http_port}", f"127.0.0.1:{relay.http_port}")
                for u in urls]
    lag: list[float] = []
    pids = {"owner": [owner.proc.pid], "relay": [relay.proc.pid] if relay else []}
    cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
    t0 = time.monotonic()
    await asyncio.gather(*(_stream(run, u, seed=i, seconds=p.stream_s, lag=lag)
                           for i, u in enumerate(urls)))
    wall = time.monotonic() - t0
    stats = []
    for s in sessions:
        async with run.http.get(f"{owner.url}/api/sessions/{s['session_id']}") as r:
            stats.append((await r.json())["stats"])
    for s in sessions:
        async with run.http.delete(f"{owner.url}/api/sessions/{s['session_id']}") as r:
            await r.read()
    totals = stream_totals(stats)
    out: dict[str, Any] = {f"ws_{tag}_{k}": v for k, v in totals.items()}
    out[f"ws_{tag}_send_lag_max_ms"] = 1000 * max(lag, default=0.0)
    out[f"ws_{tag}_send_lag_p99_ms"] = 1000 * (percentile(lag, 99) or 0.0)
    out[f"ws_{tag}_owner_cpu_pct"] = 100 * (cpu_seconds(pids["owner"]) - cpu0["owner"]) / wall
    if relay is not None:
        out[f"ws_{tag}_relay_cpu_pct"] = \
            100 * (cpu_seconds(pids["relay"]) - cpu0["relay"]) / wall
    return out


async def phase_proxy_ws(run: NodeRun) -> dict[str, Any]:
    """``streams`` WebSocket speakers for ``stream_s``, all to one owner: once straight
    to it, then (fresh sessions) each relayed by another node; the sessions' underruns
    and late frames compared."""
    p = run.params
    owner, relay = run.nodes[0], run.nodes[1]
    out: dict[str, Any] = {"ws_owner": owner.node_id, "ws_relay": relay.node_id,
                           "ws_streams": p.streams, "ws_stream_s": p.stream_s}
    run.say(f"proxy ws: {p.streams} streams for {p.stream_s:g} s straight to "
            f"{owner.node_id}")
    out.update(await _stream_run(run, owner, None, "direct"))
    run.say(f"proxy ws: {p.streams} streams for {p.stream_s:g} s to {owner.node_id} "
            f"through {relay.node_id}")
    out.update(await _stream_run(run, owner, relay, "relayed"))
    out["ws_added_underruns"] = out["ws_relayed_underruns"] - out["ws_direct_underruns"]
    out["ws_added_late_frames"] = out["ws_relayed_late_frames"] - out["ws_direct_late_frames"]
    return out


def parse_cpu_stat(text: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``'s text (idle and iowait are
    not busy)."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values[:8])  # guest time is already in user/nice
            return total - idle, total
    raise ValueError("no 'cpu' line in /proc/stat")


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The machine's busy share (0..1) between two :func:`parse_cpu_stat` readings."""
    total = after[1] - before[1]
    return 0.0 if total <= 0 else max(0.0, min(1.0, (after[0] - before[0]) / total))


def not_alive_in(view: Mapping[str, str], expected: Iterable[str]) -> list[tuple[str, str]]:
    """(member, state) of each expected member that ``view`` (node_id -> state) does not
    list alive (``missing`` when it is not listed at all)."""
    return [(m, view.get(m, "missing")) for m in sorted(expected) if view.get(m) != "alive"]


def _cpu_stat() -> tuple[int, int]:
    with open("/proc/stat") as f:
        return parse_cpu_stat(f.read())


def _children(pid: int) -> list[int]:
    """The process's children (those any of its threads started)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out.extend(int(c) for c in f.read().split())
    return out


async def _create_sink(run: NodeRun, node: Node, lesson: str, sink: str) -> dict[str, Any]:
    async with run.http.post(f"{node.url}/api/sessions",
                             json={"lesson_id": lesson, "sink": sink},
                             headers={"X-Rapido-Route": "here"},
                             timeout=aiohttp.ClientTimeout(total=30)) as r:
        body: dict[str, Any] = await r.json()
        if r.status != 201:
            raise RuntimeError(f"create {lesson} on {node.node_id}: {r.status} {body}")
    return body


async def _add_speakers(run: NodeRun, nodes: list[Node], first: int, step: int, tag: str,
                        speak: Callable[[str, int], Coroutine[Any, Any, None]],
                        sessions: list[tuple[Node, str]],
                        streams: list[asyncio.Task[None]]) -> None:
    """``step`` more speaking sessions on each node (numbered from ``first``), each fed
    by its own ``speak(ws_url, seed)`` task."""
    for n in nodes:
        for j in range(first, first + step):
            body = await _create_sink(run, n, f"bench-{tag}-{n.node_id}-{j}",
                                      run.params.load_sink)
            sessions.append((n, body["session_id"]))
            streams.append(asyncio.create_task(speak(body["ws_url"], 1000 * n.index + j)))


async def _delete_all(run: NodeRun, sessions: list[tuple[Node, str]]) -> None:
    for n, sid in sessions:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with run.http.delete(f"{n.url}/api/sessions/{sid}",
                                       timeout=aiohttp.ClientTimeout(total=30)) as r:
                await r.read()


async def phase_media_load(run: NodeRun) -> dict[str, Any]:
    """Every node at full media load (speaking sessions fed PCM in real time over
    WebSockets, each recording an MP4: H.264 by PyAV), raised ``load_step`` streams per
    node at a time until the machine is busy (≥ 95 % of all cores over 4 s) or
    ``load_max_per_node``; then ``load_loss_percent`` % random UDP loss on the agents'
    gossip ports for ``load_s``, every node's ``GET /api/cluster`` read every 0.5 s for
    any member not alive. The media's own health (underruns, late frames) is reported,
    not judged: at full load it suffers."""
    p = run.params
    nodes = run.nodes
    ids = [n.node_id for n in nodes]
    cores = os.cpu_count() or 1
    streams: list[asyncio.Task[None]] = []
    sessions: list[tuple[Node, str]] = []
    lag: list[float] = []
    failed_streams: list[str] = []

    async def speak(url: str, seed: int) -> None:
        try:
            await _stream(run, url, seed=seed, seconds=1e9, lag=lag)
        except (aiohttp.ClientError, RuntimeError, TimeoutError) as e:
            failed_streams.append(f"{type(e).__name__}: {e}"[:200])

    ramp: list[dict[str, Any]] = []
    per_node = 0
    out: dict[str, Any] = {}
    fault = None
    try:
        while per_node < p.load_max_per_node:
            step = min(p.load_step, p.load_max_per_node - per_node)
            await _add_speakers(run, nodes, per_node, step, "load", speak, sessions, streams)
            per_node += step
            before = _cpu_stat()
            await asyncio.sleep(4.0)
            busy = busy_fraction(before, _cpu_stat())
            ramp.append({"per_node": per_node, "busy_pct": round(100 * busy, 1),
                         "load1": os.getloadavg()[0]})
            run.say(f"media load: {per_node} streams per node, machine "
                    f"{100 * busy:.0f} % busy, load {os.getloadavg()[0]:.2f}")
            if busy >= 0.95:
                break
        # The 1-minute load average lags: wait (up to 60 s) until it reaches the cores.
        t0 = time.monotonic()
        for _ in range(30):
            if os.getloadavg()[0] >= cores:
                break
            await asyncio.sleep(2.0)
        out["load_settle_s"] = time.monotonic() - t0
        run.say(f"media load: {per_node} streams per node, load "
                f"{os.getloadavg()[0]:.2f}; {p.load_loss_percent:g} % UDP loss on the "
                f"gossip ports for {p.load_s:g} s, every node's view read every 0.5 s")
        pids = {n.node_id: [n.proc.pid] for n in nodes}
        agent_pids = {n.node_id: _children(n.proc.pid) for n in nodes}
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        acpu0 = {k: cpu_seconds(v) for k, v in agent_pids.items()}
        stat0, own0 = _cpu_stat(), report.process_cpu_s()
        snap0 = await run.firewall.snapshot()
        fault = await run.firewall.loss([n.gossip_port for n in nodes], p.load_loss_percent)
        t0 = time.monotonic()
        observations = 0
        seen: dict[str, int] = {}
        reads = unreadable = 0
        loads: list[float] = []
        while time.monotonic() - t0 < p.load_s:
            tick = time.monotonic()
            views = await asyncio.gather(*(members(run.http, n) for n in nodes))
            for n, view in zip(nodes, views, strict=True):
                reads += 1
                if not view:
                    unreadable += 1
                    continue
                for m, state in not_alive_in(view, ids):
                    observations += 1
                    key = f"{n.node_id} saw {m} {state}"
                    seen[key] = seen.get(key, 0) + 1
            loads.append(os.getloadavg()[0])
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - tick)))
        wall = time.monotonic() - t0
        snap1 = await run.firewall.snapshot()
        dropped = snap1.since(snap0).dropped(fault)
        packets = snap1.since(snap0).total.packets
        await run.firewall.heal(fault)
        fault = None
        busy = busy_fraction(stat0, _cpu_stat())
        node_cpu = {k: round(100 * (cpu_seconds(v) - cpu0[k]) / wall, 1)
                    for k, v in pids.items()}
        agent_cpu = {k: round(100 * (cpu_seconds(v) - acpu0[k]) / wall, 1)
                     for k, v in agent_pids.items()}
        out.update({
            "load_streams_per_node": per_node, "load_streams": len(sessions),
            "load_sink": p.load_sink, "load_ramp": ramp, "load_watch_s": wall,
            "load_node_cpu_pct": node_cpu, "load_agent_cpu_pct": agent_cpu,
            "load_node_cpu_min_pct": min(node_cpu.values(), default=0.0),
            "load_node_cpu_max_pct": max(node_cpu.values(), default=0.0),
            "load_machine_busy_pct": 100 * busy,
            "load_driver_cpu_pct": 100 * (report.process_cpu_s() - own0) / wall,
            "load_load1_min": min(loads, default=0.0),
            "load_load1_max": max(loads, default=0.0),
            "load_dropped": dropped.packets, "load_packets": packets,
            "load_not_alive": observations, "load_not_alive_seen": seen,
            "load_reads": reads, "load_unreadable": unreadable,
            "load_stream_failures": len(failed_streams),
            "load_stream_errors": failed_streams[:10],
            "load_send_lag_p99_ms": 1000 * (percentile(lag, 99) or 0.0),
            "load_send_lag_max_ms": 1000 * max(lag, default=0.0),
        })
    finally:
        if fault is not None:
            await run.firewall.heal(fault)
        await cancel_and_wait(streams)
    stats = []
    for n, sid in sessions:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            async with run.http.get(f"{n.url}/api/sessions/{sid}",
                                    timeout=aiohttp.ClientTimeout(total=10)) as r:
                stats.append((await r.json())["stats"])
    await _delete_all(run, sessions)
    out.update({f"load_{k}": v for k, v in stream_totals(stats).items()})
    return out


async def phase_node_kill(run: NodeRun) -> dict[str, Any]:
    """kill -9 of a lesson's owner; a create of the lesson through every survivor, in
    rounds, until all answer 200/201 with one session, on a survivor; and until every
    survivor lists the owner failed."""
    lesson = "bench-kill"
    body = await _created(run, run.nodes[0], lesson)
    owner = run.node(body["node"])
    survivors = [n for n in run.nodes if n is not owner]
    ids = {n.node_id for n in survivors}
    run.say(f"node kill: kill -9 {owner.node_id} (owner of {lesson}); until every "
            f"survivor answers the lesson with one session")
    t0 = time.monotonic()
    run.fleet.kill(owner)
    rounds: list[dict[str, Any]] = []

    async def answered() -> bool:
        answers = await asyncio.gather(*(create(run.http, n, lesson, timeout_s=5)
                                         for n in survivors))
        sids = {b.get("session_id") for _, b in answers}
        nodes = {b.get("node") for _, b in answers}
        ok = (all(s in (200, 201) for s, _ in answers) and len(sids) == 1
              and nodes <= ids)
        if len(rounds) < 200:
            rounds.append({"at_s": round(time.monotonic() - t0, 2),
                           "answers": [[s, b.get("node") or b.get("error")]
                                       for s, b in answers]})
        return ok

    async def failed() -> bool:
        return all(await asyncio.gather(*(lists_all(run.http, n, {owner.node_id: "failed"})
                                          for n in survivors)))

    again, failed_s = await asyncio.gather(until(answered, 60, every_s=0.25),
                                           until(failed, 60, every_s=0.25))
    again_s = None if again is None else again
    return {"kill_owner": owner.node_id, "again_s": again_s, "failed_s": failed_s,
            "kill_rounds": rounds[:40]}


_SCALE_GAUGES = re.compile(
    r"^cluster_(recommended_nodes|streams|capacity_streams|cpu_nodes|memory_nodes) (\S+)$",
    re.M)


async def _scale_gauges(run: NodeRun, node: Node) -> dict[str, float]:
    async with run.http.get(f"{node.url}/metrics",
                            timeout=aiohttp.ClientTimeout(total=10)) as r:
        text = await r.text()
    return {m.group(1): float(m.group(2)) for m in _SCALE_GAUGES.finditer(text)}


async def phase_scale(run: NodeRun) -> dict[str, Any]:
    """A load ramp and the scale signals: ``scale_step`` speaking streams recording MP4s
    added per node at a time (as media_load) up to ``scale_max_per_node``; after each
    step, once the nodes' tags had time to spread (``scale_settle_s``), every node's
    cluster gauges are read: ``cluster_recommended_nodes`` must follow the load, the
    same on every node."""
    p = run.params
    nodes = run.nodes
    streams: list[asyncio.Task[None]] = []
    sessions: list[tuple[Node, str]] = []

    async def speak(url: str, seed: int) -> None:
        with contextlib.suppress(aiohttp.ClientError, RuntimeError, TimeoutError):
            await _stream(run, url, seed=seed, seconds=1e9, lag=[])

    rows: list[dict[str, Any]] = []
    per_node = 0
    try:
        while True:
            before = _cpu_stat()
            await asyncio.sleep(p.scale_settle_s)
            busy = busy_fraction(before, _cpu_stat())
            gauges = await asyncio.gather(*(_scale_gauges(run, n) for n in nodes))
            recommended = sorted({int(g.get("recommended_nodes", -1)) for g in gauges})
            row = {"per_node": per_node, "streams": len(sessions),
                   "gauge_streams": gauges[0].get("streams"),
                   "capacity": gauges[0].get("capacity_streams"),
                   "cpu_nodes": gauges[0].get("cpu_nodes"),
                   "memory_nodes": gauges[0].get("memory_nodes"),
                   "recommended": recommended,
                   "machine_busy_pct": round(100 * busy, 1)}
            rows.append(row)
            run.say(f"scale: {len(sessions)} streams, cpu {row['cpu_nodes']} nodes' worth, "
                    f"recommended nodes {recommended}")
            if per_node >= p.scale_max_per_node:
                break
            step = min(p.scale_step, p.scale_max_per_node - per_node)
            await _add_speakers(run, nodes, per_node, step, "scale", speak, sessions, streams)
            per_node += step
    finally:
        await cancel_and_wait(streams)
        await _delete_all(run, sessions)
    agree = all(len(r["recommended"]) == 1 for r in rows)
    first, last = rows[0]["recommended"][-1], rows[-1]["recommended"][-1]
    return {"scale_ramp": rows, "scale_agree": agree,
            "scale_recommended_first": first, "scale_recommended_last": last}


#: The phases of a --nodes run, in the order they run (the kill last: it takes a node,
#: which the media load's watch would then count as not alive).
NODE_PHASES: dict[str, Callable[[NodeRun], Awaitable[dict[str, Any]]]] = {
    "proxy_rest": phase_proxy_rest,
    "proxy_ws": phase_proxy_ws,
    "media_load": phase_media_load,
    "scale": phase_scale,
    "node_kill": phase_node_kill,
}
assert tuple(NODE_PHASES) == NODE_PHASE_NAMES, "rapido.bench.args lists them for the CLI"


async def nodes_scenario(firewall: Firewall, params: dict[str, Any]) -> dict[str, Any]:
    """The whole --nodes run, inside the namespace (run_in_netns target)."""
    p = NodeParams(**{**params, "phases": tuple(params.get("phases", ()))})
    wanted = p.phases or tuple(NODE_PHASES)
    with tempfile.TemporaryDirectory(prefix="rapido-bench-nodes-") as tmp:
        capacity = (p.scale_capacity if wanted == ("scale",)
                    else max(2 * p.streams, p.load_max_per_node) + 8)
        fleet = NodeFleet(Path(tmp), firewall=firewall, max_streams=capacity)
        async with aiohttp.ClientSession() as http:
            run = NodeRun(p, firewall, fleet, http)
            run.results["nodes"] = p.nodes
            try:
                run.say(f"starting {p.nodes} rapido nodes (--model none)")
                t0 = time.monotonic()
                nodes = await fleet.start(p.nodes, http)
                run.results["start_s"] = time.monotonic() - t0
                alive = dict.fromkeys((n.node_id for n in nodes), "alive")

                async def converged() -> bool:
                    return all(await asyncio.gather(*(lists_all(http, n, alive)
                                                      for n in nodes)))

                run.results["converged_s"] = await until(converged, 30)
                for name, phase in NODE_PHASES.items():
                    if name not in wanted or (name == "media_load" and p.load_s <= 0):
                        continue
                    t0 = time.monotonic()
                    out = await phase(run)
                    out[f"{name}_wall_s"] = time.monotonic() - t0
                    run.results.update(out)
                    keys = [k for k, _ in NODE_ROWS if k in out]
                    run.say(f"{name}: done ("
                            + ", ".join(f"{k} {report.cell(out[k])}" for k in keys) + ")")
            finally:
                await fleet.aclose()
    return run.results


def node_verdicts(run: dict[str, Any]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for key, (_, limit) in NODE_TARGETS.items():
        value = run.get(key)
        out[key] = None if value is None else value <= limit
    return out


def print_node_table(run: dict[str, Any], file: Any = None) -> None:
    out = file or sys.stdout
    if "error" in run:
        print(f"{run.get('nodes')} nodes: {run['error']}", file=out)
        return
    checks = node_verdicts(run)
    lines = [["", "target", f"{run.get('nodes')} nodes"]]
    for key, label in NODE_ROWS:
        if key not in run:
            continue
        cell = report.cell(run[key]) + (" (missed)" if checks.get(key) is False else "")
        lines.append([label, NODE_TARGETS.get(key, ("", 0.0))[0], cell])
    widths = [max(len(row[i]) for row in lines) for i in range(3)]
    for row in lines:
        print(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  "
              f"{row[2].rjust(widths[2])}", file=out)
    if run.get("scale_ramp"):
        print_scale_ramp(run["scale_ramp"], out)


def print_scale_ramp(rows: Sequence[dict[str, Any]], out: Any) -> None:
    """The load ramp of the scale phase, one line per step."""
    print("\nscale signals over the load ramp (every node's gauges):", file=out)
    print(f"{'streams':>8} {'gauge':>6} {'capacity':>9} {'cpu (nodes)':>12} "
          f"{'memory (nodes)':>15} {'busy %':>7}  recommended", file=out)
    for r in rows:
        cell = report.cell
        print(f"{r['streams']:>8} {cell(r['gauge_streams']):>6} {cell(r['capacity']):>9} "
              f"{cell(r['cpu_nodes']):>12} {cell(r['memory_nodes']):>15} "
              f"{r['machine_busy_pct']:>7}  {r['recommended']}", file=out)


def nodes_main(args: argparse.Namespace) -> int:
    params = dataclasses.asdict(NodeParams(
        nodes=args.nodes, rest_requests=args.rest_requests, streams=args.streams,
        stream_s=args.stream_s, load_s=args.load_s,
        phases=tuple(args.phases.split(",")) if args.phases else ()))
    budget = 240 + 4 * args.stream_s + args.rest_requests / 20 + 240 + args.load_s
    interrupted = False
    try:
        run = run_in_netns("rapido.bench.cluster_nodes:nodes_scenario", params, timeout_s=budget)
    except NetnsError as e:
        print(f"rapido: bench cluster: {args.nodes} nodes: {e}", file=sys.stderr)
        run = {"nodes": args.nodes, "error": str(e)}
    except KeyboardInterrupt:
        print("rapido: bench cluster: interrupted", file=sys.stderr)
        run = {"nodes": args.nodes, "error": "interrupted"}
        interrupted = True
    command = (f"python -m rapido bench cluster --nodes {args.nodes} --streams "
               f"{args.streams} --stream-s {args.stream_s:g} --rest-requests "
               f"{args.rest_requests} --load-s {args.load_s:g}"
               + (f" --phases {args.phases}" if args.phases else ""))
    doc: dict[str, Any] = {"command": command, "date": time.strftime("%Y-%m-%d"),
                           "machine": report.host_summary(),
                           "targets": {k: t for k, (t, _) in NODE_TARGETS.items()},
                           "runs": [run], "interrupted": interrupted}
    if args.json_file == "-":
        print(json.dumps(doc, indent=2))
    else:
        print_node_table(run)
        if args.json_file:
            Path(args.json_file).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"json: {args.json_file}")
    return 130 if interrupted else (1 if "error" in run else 0)
