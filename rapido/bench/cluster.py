"""``rapido bench cluster``: how the Serf agents under a rapido cluster behave, measured
with real agents (:mod:`rapido.bench.fleet`) in a network namespace of their own
(:mod:`rapido.bench.netns`, which needs root): nothing reaches the machine's network, and
nftables in the namespace injects loss and counts the gossip bytes.

One run per agent count (``--agents 5,50,100``: side by side, one fresh namespace each),
in phases, each a function ``async def phase_x(run) -> dict`` (with ``--nodes M``
instead: M rapido nodes, :mod:`rapido.bench.cluster_nodes`):

* ``join``: N agents started, then all join agent-000 at once: until every agent's
  members lists N alive;
* ``tags``: a tag written on one agent (``tags`` RPC): until every agent lists it;
* ``bytes_idle`` / ``bytes_churn``: gossip bytes per node per second (nftables counters
  on the agents' ports: 2 x all bytes / N, each packet has a sender and a receiver),
  idle, then with every node changing a tag every 2 s whether or not its last write
  returned (the offered load; rapido's TagWriter writes at most that often);
* ``churn_serial``: the same churn the way rapido writes it, each write awaited: how
  many writes get through and how many fail (Serf's 5 s broadcast timeout);
* ``join_one``: one more agent joins the settled cluster: until every member lists it;
* ``loss``: 10 % random UDP loss on every agent's port for ``--loss-s``: every member ever
  seen not alive by any agent (reads of a sample of agents in turn, plus every agent's
  member-failed/member-leave events);
* ``kill``: kill -9 of one agent: until every other agent lists it failed.

Reads cost CPU the agents need (on a 2-core machine 100 agents share the cores with the
reader), so each phase reports the agents' and the driver's CPU: a starved agent misses
its probes and is declared failed (a 10 s stall was).

Why one module over 500 lines: the eight phases share one run object (the fleet, the
namespace's firewall, the results) and the command that prints their table; split per
phase they would import each other's helpers back.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapido.aio import cancel_and_wait
from rapido.bench import report
from rapido.bench.args import (
    CLUSTER_PHASES,
    parse_counts,
    validate_cluster,
)
from rapido.bench.cluster_nodes import nodes_main
from rapido.bench.fleet import (
    Fleet,
    FleetAgent,
    Watch,
    cpu_seconds,
    lists,
    not_alive,
    rapido_tags,
    until_all,
    watch_not_alive,
)
from rapido.bench.netns import Firewall, NetnsError, netns_problem, run_in_netns
from rapido.cluster.serf import SerfClient, SerfError

#: The targets the issue sets for the gossip layer, by agent count.
TARGETS: dict[str, tuple[str, Callable[[int], float]]] = {
    "join_one_s": ("≤ 3 s", lambda n: 3.0),
    "tag_all_s": ("≤ 1 s", lambda n: 1.0),
    "kill_failed_s": ("≤ 8 s at 5, ≤ 12 s above", lambda n: 8.0 if n <= 5 else 12.0),
    "loss_not_alive": ("0", lambda n: 0.0),
    "churn_kbps_per_node": ("≤ 2 KB/s at 100", lambda n: 2.0),
}

ROWS: tuple[tuple[str, str], ...] = (
    ("start_s", "start N agents (until their RPC answers), s"),
    ("join_all_s", "join: all N list all N alive, s"),
    ("join_one_s", "one more joins: all list it alive, s"),
    ("join_one_self_s", "one more joins: it lists all alive, s"),
    ("tag_all_s", "tag write seen everywhere (worst trial), s"),
    ("tag_median_s", "tag write seen everywhere (median trial), s"),
    ("tag_rpc_s", "tags RPC returns (worst trial), s"),
    ("kill_failed_s", "kill -9: all others list it failed, s"),
    ("kill_first_s", "kill -9: first agent lists it failed, s"),
    ("loss_not_alive", "10 % UDP loss: not-alive observations"),
    ("loss_events", "10 % UDP loss: member-failed/leave events"),
    ("loss_dropped", "10 % UDP loss: packets dropped"),
    ("loss_reads_per_agent_s", "10 % UDP loss: reads per agent per s"),
    ("idle_kbps_per_node", "gossip idle, KB/s per node (sent+received)"),
    ("churn_kbps_per_node", "gossip, tag change every 2 s, KB/s per node"),
    ("churn_kbps_max_port", "  same, busiest agent's port, KB/s"),
    ("churn_not_alive", "  not-alive observations meanwhile"),
    ("churn_writes_per_s", "  tag writes issued per s (all agents)"),
    ("churn_writes_failed", "  of which the tags RPC failed (in the window)"),
    ("churn_write_rpc_p50_s", "  tags RPC time, median of those that returned, s"),
    ("serial_kbps_per_node", "gossip, rapido's serial writer, KB/s per node"),
    ("serial_writes_per_s", "  tag writes done per s (all agents)"),
    ("serial_not_alive", "  not-alive observations meanwhile"),
    ("serial_writes_failed", "  of which the tags RPC failed"),
    ("serial_write_rpc_p50_s", "  tags RPC time, median of those that returned, s"),
    ("agents_cpu_idle_pct", "agents' CPU idle, % of a core"),
    ("agents_cpu_churn_pct", "agents' CPU under tag churn, % of a core"),
    ("bytes_churn_load1", "  load average (1 min) at its end"),
    ("loss_agents_cpu_pct", "agents' CPU while watching loss, % of a core"),
    ("driver_cpu_loss_pct", "driver's CPU while watching loss, % of a core"),
)


@dataclass(frozen=True)
class Params:
    agents: int
    loss_s: float = 60.0
    loss_percent: float = 10.0
    bytes_s: float = 60.0
    churn_every_s: float = 2.0
    tag_trials: int = 10
    poll_every_s: float = 0.5
    #: Agents read per poll round while watching for false positives (all when fewer).
    sample: int = 50
    phases: tuple[str, ...] = ()  # empty: all, in order


# ------------------------------------------------------------------------- the run


@dataclass
class Run:
    """One agent count in one namespace: the phases share it."""

    params: Params
    firewall: Firewall
    fleet: Fleet
    results: dict[str, Any] = field(default_factory=dict)

    def say(self, text: str) -> None:
        print(f"[{self.params.agents} agents] {text}", file=sys.stderr, flush=True)

    @property
    def agents(self) -> list[FleetAgent]:
        return self.fleet.live()


Phase = Callable[[Run], Awaitable[dict[str, Any]]]


async def phase_join(run: Run) -> dict[str, Any]:
    n = run.params.agents
    run.say(f"join: starting {n} agents")
    t0 = time.monotonic()
    agents = await run.fleet.start(n)
    started = time.monotonic() - t0
    run.say(f"join: started in {started:.1f} s; all join {agents[0].name}")
    t0 = time.monotonic()
    await run.fleet.join(agents)
    joined_rpc = time.monotonic() - t0

    names = {a.name for a in agents}
    #: What an agent still short of N after 5 s lists (once per agent): why it lags.
    laggards: dict[str, dict[str, Any]] = {}

    async def all_alive(a: FleetAgent) -> bool:
        alive = {m.name for m in await a.client.members_filtered(status="alive")}
        if alive != names and time.monotonic() - t0 > 5 and a.name not in laggards:
            laggards[a.name] = {"at_s": round(time.monotonic() - t0, 1),
                                "alive": len(alive), "not_listed": sorted(names - alive),
                                "not_alive": await not_alive(a)}
        return alive == names

    spread = await until_all(agents, all_alive, t0=t0, timeout_s=60 + n * 0.5,
                             every_s=0.2)
    slow = sorted(spread.seen_s.items(), key=lambda kv: -kv[1])[:5]
    return {"start_s": started, "join_rpcs_s": joined_rpc, "join_all_s": spread.all_s,
            "join_median_s": spread.median_s, "join_missing": spread.missing,
            "join_slowest": slow, "join_laggards": dict(list(laggards.items())[:10]),
            "join_laggard_count": len(laggards), "join_read_round_s": spread.round_s}


async def phase_tags(run: Run) -> dict[str, Any]:
    agents = run.agents
    trials: list[dict[str, Any]] = []
    alls: list[float | None] = []
    rpcs: list[float] = []
    run.say(f"tags: {run.params.tag_trials} writes, each until every agent lists it")
    for trial in range(run.params.tag_trials):
        writer = agents[(1 + trial * 7) % len(agents)]
        value = rapido_tags(writer.index, load=0.05 * (trial + 1) + 0.5)["ld"]
        slow = await writer.slow()
        t0 = time.monotonic()
        write = asyncio.create_task(_timed(slow.tags(set={"ld": value})))

        async def shows(a: FleetAgent, w: FleetAgent = writer, v: str = value) -> bool:
            return await lists(a, w.name, "alive", {"ld": v})

        spread = await until_all(agents, shows, t0=t0, timeout_s=30, every_s=0.05)
        rpc_s = await write
        alls.append(spread.all_s)
        rpcs.append(rpc_s)
        trials.append({"writer": writer.name, "all_s": spread.all_s,
                       "median_s": spread.median_s, "missing": spread.missing,
                       "read_round_s": spread.round_s, "rpc_s": rpc_s})
        await asyncio.sleep(0.5)
    ordered = sorted(a for a in alls if a is not None)
    worst = None if len(ordered) < len(alls) else max(ordered, default=None)
    return {"tag_all_s": worst, "tag_median_s": ordered[len(ordered) // 2] if ordered else None,
            "tag_rpc_s": max(rpcs, default=None), "trials": trials}


async def _timed(call: Awaitable[None]) -> float:
    t0 = time.monotonic()
    await call
    return time.monotonic() - t0


async def _bytes(run: Run, seconds: float) -> dict[str, Any]:
    n = len(run.agents)
    before = await run.firewall.snapshot()
    await asyncio.sleep(seconds)
    after = await run.firewall.snapshot()
    d = after.since(before)
    ports = [a.port for a in run.agents]
    per_port = [d.port_bytes(p) / d.at / 1000 for p in ports]
    return {"window_s": d.at, "total_bytes": d.total.bytes, "total_packets": d.total.packets,
            # Each packet is sent by one agent and received by another: 2 x total / N.
            "kbps_per_node": 2 * d.total.bytes / n / d.at / 1000,
            "kbps_max_port": max(per_port, default=0.0),
            "kbps_min_port": min(per_port, default=0.0)}


async def phase_bytes_idle(run: Run) -> dict[str, Any]:
    run.say(f"bytes idle: {run.params.bytes_s:.0f} s")
    out = await _bytes(run, run.params.bytes_s)
    return {"idle_kbps_per_node": out["kbps_per_node"], "idle": out}


async def phase_bytes_churn(run: Run) -> dict[str, Any]:
    """Every agent changes its ``ld`` tag every ``churn_every_s``, whether its last
    write has returned or not (a ``tags`` RPC waits for the broadcast, up to Serf's
    5 s broadcast timeout; writes go round-robin over 3 connections per agent, as the
    agent runs one connection's commands in order). rapido's own writer waits for each
    write, so under a saturated gossip it writes less often than this."""
    p = run.params
    agents = run.agents
    run.say(f"bytes churn: every agent writes a tag every {p.churn_every_s:.0f} s, "
            f"{p.bytes_s:.0f} s measured")
    rpc_times: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    measuring = False
    pending: set[asyncio.Task[None]] = set()
    conns = {a.name: [await a.agent.connect() for _ in range(3)] for a in agents}

    async def write(client: SerfClient, value: str, counted: bool) -> None:
        t0 = time.monotonic()
        try:
            await client.tags(set={"ld": value})
        except SerfError as e:
            if counted:
                errors[str(e)] = errors.get(str(e), 0) + 1
            return
        if counted:
            rpc_times.append(time.monotonic() - t0)

    async def churn(a: FleetAgent, offset: float) -> None:
        nonlocal issued
        await asyncio.sleep(offset)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        for k in itertools.count():
            issued += measuring
            task = asyncio.create_task(write(conns[a.name][k % 3],
                                             "0.10" if k % 2 else "0.15", measuring))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += p.churn_every_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    tasks = [asyncio.create_task(churn(a, i * p.churn_every_s / len(agents)))
             for i, a in enumerate(agents)]
    try:
        await asyncio.sleep(p.churn_every_s * 3)  # the queues fill
        measuring = True
        cpu0, t0 = cpu_seconds(run.fleet.pids()), time.monotonic()
        watch = asyncio.create_task(_watch_quietly(agents, p.bytes_s))
        out = await _bytes(run, p.bytes_s)
        cpu = (cpu_seconds(run.fleet.pids()) - cpu0) / (time.monotonic() - t0)
        measuring = False
        seen = await watch
    finally:
        await cancel_and_wait(tasks)
        await cancel_and_wait(list(pending))
        for clients in conns.values():
            for c in clients:
                await c.aclose()
    rpc_times.sort()
    run.say("bytes churn: letting the gossip settle")
    await asyncio.sleep(5)
    return {"churn_kbps_per_node": out["kbps_per_node"],
            "churn_kbps_max_port": out["kbps_max_port"],
            "churn_writes_per_s": issued / out["window_s"],
            "churn_writes_ok": len(rpc_times), "churn_writes_failed": sum(errors.values()),
            "churn_errors": errors,
            "churn_write_rpc_p50_s": rpc_times[len(rpc_times) // 2] if rpc_times else None,
            "churn_write_rpc_max_s": rpc_times[-1] if rpc_times else None,
            "agents_cpu_churn_pct": 100 * cpu, "churn_not_alive": seen.not_alive,
            "churn_watch": seen.json(), "churn": out}


async def _watch_quietly(agents: Sequence[FleetAgent], seconds: float) -> Watch:
    """False positives while something else is measured: every agent's member events,
    and 10 agents read in turn every second (few reads: the agents need the CPU)."""
    return await watch_not_alive(agents, seconds, every_s=1.0, sample=10)


async def phase_churn_serial(run: Run) -> dict[str, Any]:
    """The same churn as rapido writes it (cluster.service, TagWriter): one connection
    per agent, each write awaited, the next one ``churn_every_s`` after the previous
    one started or when it returned, whichever is later."""
    p = run.params
    agents = run.agents
    window = max(10.0, p.bytes_s / 2)
    run.say(f"churn serial: every agent writes a tag every {p.churn_every_s:.0f} s or "
            f"when its last write returned, {window:.0f} s measured")
    rpc_times: list[float] = []
    errors: dict[str, int] = {}
    measuring = False
    done = 0

    async def churn(a: FleetAgent, offset: float) -> None:
        nonlocal done
        slow = await a.slow()
        await asyncio.sleep(offset)
        for k in itertools.count():
            t0 = time.monotonic()
            counted = measuring
            try:
                await slow.tags(set={"ld": "0.20" if k % 2 else "0.25"})
                if counted:
                    rpc_times.append(time.monotonic() - t0)
            except SerfError as e:
                if counted:
                    errors[str(e)] = errors.get(str(e), 0) + 1
            done += counted
            await asyncio.sleep(max(0.0, t0 + p.churn_every_s - time.monotonic()))

    tasks = [asyncio.create_task(churn(a, i * p.churn_every_s / len(agents)))
             for i, a in enumerate(agents)]
    try:
        await asyncio.sleep(p.churn_every_s * 3)
        measuring = True
        watch = asyncio.create_task(_watch_quietly(agents, window))
        out = await _bytes(run, window)
        measuring = False
        seen = await watch
    finally:
        await cancel_and_wait(tasks)
    rpc_times.sort()
    await asyncio.sleep(5)
    return {"serial_kbps_per_node": out["kbps_per_node"],
            "serial_writes_per_s": done / out["window_s"],
            "serial_writes_ok": len(rpc_times), "serial_writes_failed": sum(errors.values()),
            "serial_errors": errors,
            "serial_write_rpc_p50_s": rpc_times[len(rpc_times) // 2] if rpc_times else None,
            "serial_write_rpc_max_s": rpc_times[-1] if rpc_times else None,
            "serial_not_alive": seen.not_alive, "serial_watch": seen.json(), "serial": out}


async def phase_join_one(run: Run) -> dict[str, Any]:
    run.say("join one: one more agent joins the settled cluster")
    new, = await run.fleet.start(1)
    agents = run.agents
    n = len(agents)
    t0 = time.monotonic()
    join = asyncio.create_task((await new.slow()).join([agents[0].bind]))
    spread = await until_all(agents, lambda a: lists(a, new.name, "alive"), t0=t0,
                             timeout_s=60, every_s=0.1)

    async def sees_all(a: FleetAgent) -> bool:
        return len(await a.client.members_filtered(status="alive")) == n

    itself = await until_all([new], sees_all, t0=t0, timeout_s=60, every_s=0.1)
    await join
    return {"join_one_s": spread.all_s, "join_one_median_s": spread.median_s,
            "join_one_missing": spread.missing, "join_one_self_s": itself.all_s,
            "join_one_read_round_s": spread.round_s}


async def phase_loss(run: Run) -> dict[str, Any]:
    p = run.params
    agents = run.agents
    n = len(agents)
    sample = min(n, p.sample)
    run.say(f"loss: {p.loss_percent:g} % UDP loss for {p.loss_s:.0f} s; reading "
            f"{sample} of {n} agents every {p.poll_every_s} s in turn, and every "
            f"agent's member events")
    faults = []
    snaps = []

    async def start_loss() -> None:
        faults.append(await run.firewall.loss([a.port for a in agents], p.loss_percent))
        snaps.append(await run.firewall.snapshot())

    cpu0 = report.process_cpu_s()
    try:
        watch = await watch_not_alive(agents, p.loss_s, every_s=p.poll_every_s,
                                      sample=sample, started=start_loss)
        driver_cpu = (report.process_cpu_s() - cpu0) / (watch.seconds + 1.7)
    finally:
        if faults:
            snaps.append(await run.firewall.snapshot())
            await run.firewall.heal(faults[0])
    d = snaps[-1].since(snaps[0])
    return {"loss_not_alive": watch.not_alive, "loss_observations": watch.observations,
            "loss_events": len(watch.events), "loss_watch": watch.json(),
            "loss_dropped": d.dropped(faults[0]).packets, "loss_packets": d.total.packets,
            "loss_reads_per_agent_s": watch.reads / n / watch.seconds,
            "driver_cpu_loss_pct": 100 * driver_cpu}


async def phase_kill(run: Run) -> dict[str, Any]:
    agents = run.agents
    victim = agents[len(agents) // 2]
    others = [a for a in agents if a is not victim]
    run.say(f"kill: kill -9 {victim.name}; until all {len(others)} others list it failed")
    t0 = time.monotonic()
    run.fleet.kill(victim)
    spread = await until_all(others, lambda a: lists(a, victim.name, "failed"), t0=t0,
                             timeout_s=60, every_s=0.2)
    return {"kill_victim": victim.name, "kill_failed_s": spread.all_s,
            "kill_first_s": min(spread.seen_s.values(), default=None),
            "kill_median_s": spread.median_s, "kill_missing": spread.missing,
            "kill_read_round_s": spread.round_s}


#: The phases, in the order they run (each may rely on the ones before it).
PHASES: dict[str, Phase] = {
    "join": phase_join,
    "tags": phase_tags,
    "bytes_idle": phase_bytes_idle,
    "bytes_churn": phase_bytes_churn,
    "churn_serial": phase_churn_serial,
    "join_one": phase_join_one,
    "loss": phase_loss,
    "kill": phase_kill,
}
assert tuple(PHASES) == CLUSTER_PHASES, "rapido.bench.args lists the phases for the CLI"


async def scenario(firewall: Firewall, params: dict[str, Any]) -> dict[str, Any]:
    """The whole run for one agent count, inside the namespace (run_in_netns target)."""
    p = Params(**{**params, "phases": tuple(params.get("phases", ()))})
    wanted = p.phases or tuple(PHASES)
    with tempfile.TemporaryDirectory(prefix="rapido-bench-cluster-") as tmp:
        fleet = Fleet(Path(tmp), firewall=firewall, grouped=False)
        run = Run(p, firewall, fleet)
        run.results["agents"] = p.agents
        try:
            for name in PHASES:
                if name != "join" and name not in wanted:
                    continue
                cpu0, t0 = cpu_seconds(fleet.pids()), time.monotonic()
                own0 = report.process_cpu_s()
                out = await PHASES[name](run)
                wall = time.monotonic() - t0
                out[f"{name}_wall_s"] = wall
                out[f"{name}_agents_cpu_pct"] = 100 * (cpu_seconds(fleet.pids()) - cpu0) / wall
                out[f"{name}_driver_cpu_pct"] = 100 * (report.process_cpu_s() - own0) / wall
                out[f"{name}_load1"] = os.getloadavg()[0]
                run.results.update(out)
                run.say(f"{name}: done in {wall:.1f} s " + _brief(name, out))
            run.results["agents_cpu_idle_pct"] = run.results.get("bytes_idle_agents_cpu_pct")
        finally:
            await fleet.aclose()
    return run.results


def _brief(name: str, out: dict[str, Any]) -> str:
    keys = [k for k, _ in ROWS if k in out]
    return "(" + ", ".join(f"{k} {report.cell(out[k])}" for k in keys) + ")" if keys else ""


# ---------------------------------------------------------------------- the command


def cluster_main(args: argparse.Namespace) -> int:
    problem = validate_cluster(args)
    if problem is None:
        problem = netns_problem()
        if problem is not None:
            problem = f"needs a network namespace: {problem}"
    if problem is None and not _has_serf():
        problem = "serf not found (Debian package serf)"
    if problem:
        print(f"rapido: bench cluster: {problem}", file=sys.stderr)
        return 2
    if args.nodes is not None:
        return nodes_main(args)
    counts = parse_counts(args.agents)
    runs: dict[int, dict[str, Any]] = {}
    interrupted = False
    for n in counts:
        params = dataclasses.asdict(Params(
            agents=n, loss_s=args.loss_s, bytes_s=args.bytes_s, sample=args.sample,
            phases=tuple(args.phases.split(",")) if args.phases else ()))
        budget = 300 + 2 * n + args.loss_s + 2 * args.bytes_s
        try:
            runs[n] = run_in_netns("rapido.bench.cluster:scenario", params, timeout_s=budget)
        except NetnsError as e:
            print(f"rapido: bench cluster: {n} agents: {e}", file=sys.stderr)
            runs[n] = {"agents": n, "error": str(e)}
        except KeyboardInterrupt:
            interrupted = True
            print("rapido: bench cluster: interrupted", file=sys.stderr)
            break
    command = (f"python -m rapido bench cluster --agents {args.agents} --loss-s {args.loss_s:g} "
               f"--bytes-s {args.bytes_s:g} --sample {args.sample}"
               + (f" --phases {args.phases}" if args.phases else ""))
    doc: dict[str, Any] = {"command": command, "date": time.strftime("%Y-%m-%d"),
           "machine": report.host_summary(), "targets": {k: t for k, (t, _) in TARGETS.items()},
           "runs": [runs[n] for n in counts if n in runs], "interrupted": interrupted}
    if args.json_file == "-":
        print(json.dumps(doc, indent=2))
    else:
        print_table(list(doc["runs"]))
        if args.json_file:
            Path(args.json_file).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"json: {args.json_file}")
    failed = any("error" in r for r in runs.values())
    return 130 if interrupted else (1 if failed else 0)


def verdicts(run: dict[str, Any]) -> dict[str, bool | None]:
    """Whether each target is met in one run (None: not measured)."""
    n = run.get("agents", 0)
    out: dict[str, bool | None] = {}
    for key, (_, limit) in TARGETS.items():
        value = run.get(key)
        out[key] = None if value is None else value <= limit(n)
    return out


def print_table(runs: Sequence[dict[str, Any]], file: Any = None) -> None:
    out = file or sys.stdout
    if not runs:
        print("(no runs)", file=out)
        return
    head = ["", "target", *(f"{r.get('agents')} agents" for r in runs)]
    lines = []
    checks = [verdicts(r) for r in runs]
    for key, label in ROWS:
        if not any(key in r for r in runs):
            continue
        target = TARGETS.get(key, ("", None))[0]
        cells = []
        for r, v in zip(runs, checks, strict=True):
            cell = report.cell(r.get(key)) if "error" not in r else "error"
            if v.get(key) is False:
                cell += " (missed)"
            cells.append(cell)
        lines.append([label, target, *cells])
    widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
    print("  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(head, widths, strict=True))), file=out)
    for row in lines:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))), file=out)
    for r in runs:
        if "error" in r:
            print(f"{r.get('agents')} agents: {r['error']}", file=out)


def _has_serf() -> bool:
    return shutil.which("serf") is not None
