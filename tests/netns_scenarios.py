"""Scenarios that run inside a network namespace (rapido.bench.netns.run_in_netns), for
tests/test_cluster_faults.py. Each is ``async def name(firewall, params) -> dict``: it
starts what it needs on 127.0.0.1, injects faults with the firewall and returns JSON-able
observations; the test asserts on them. Kept apart from the test module so the child
process imports only rapido.bench (not pytest's fixtures and the node they build)."""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rapido.bench.fleet import Fleet, FleetAgent, lists, until_all, watch_not_alive
from rapido.bench.netns import Endpoint, Firewall, Snapshot, group_argv


async def _converged(fleet: Fleet, n: int, timeout_s: float = 30) -> dict[str, Any]:
    agents = await fleet.start(n)
    t0 = time.monotonic()
    await fleet.join(agents)

    async def all_alive(a: FleetAgent) -> bool:
        return len(await a.client.members_filtered(status="alive")) == n

    spread = await until_all(agents, all_alive, t0=t0, timeout_s=timeout_s)
    return {"converged_s": spread.all_s, "not_converged": spread.missing}


async def _views(agents: list[FleetAgent]) -> dict[str, dict[str, str]]:
    """Every agent's members and their status (what the assertions read)."""
    out = {}
    for a in agents:
        out[a.name] = {m.name: m.status for m in await a.client.members()}
    return out


async def loss(firewall: Firewall, params: dict[str, Any]) -> dict[str, Any]:
    """N agents converge; then ``percent`` % random UDP loss for ``seconds`` while every
    agent is read every 0.5 s and its member events followed."""
    n, seconds, percent = params["agents"], params["seconds"], params["percent"]
    with tempfile.TemporaryDirectory(prefix="rapido-faults-") as tmp:
        fleet = Fleet(Path(tmp), firewall=firewall)
        try:
            out = await _converged(fleet, n)
            agents = fleet.live()
            faults = []
            snaps: list[Snapshot] = []

            async def start() -> None:
                faults.append(await firewall.loss([a.port for a in agents], percent))
                snaps.append(await firewall.snapshot())

            watch = await watch_not_alive(agents, seconds, every_s=0.5, started=start)
            snaps.append(await firewall.snapshot())
            d = snaps[-1].since(snaps[0])
            udp_to_agents = sum(d.rx[a.port].packets for a in agents)
            out.update(watch=watch.json(), dropped=d.dropped(faults[0]).packets,
                       packets_to_agents=udp_to_agents, views=await _views(agents))
            return out
        finally:
            await fleet.aclose()


async def partition(firewall: Firewall, params: dict[str, Any]) -> dict[str, Any]:
    """N agents converge; the first ``split`` are cut off from the others until every
    agent lists the other side failed; then healed until every agent lists all alive."""
    n, split = params["agents"], params["split"]
    with tempfile.TemporaryDirectory(prefix="rapido-faults-") as tmp:
        fleet = Fleet(Path(tmp), firewall=firewall,
                      reconnect_interval_s=params["reconnect_interval_s"])
        try:
            out = await _converged(fleet, n)
            agents = fleet.live()
            left, right = agents[:split], agents[split:]
            fault = await firewall.partition([a.endpoint for a in left],
                                             [a.endpoint for a in right])
            t0 = time.monotonic()

            async def sees_split(a: FleetAgent) -> bool:
                others = right if a in left else left
                for o in others:
                    if not await lists(a, o.name, "failed"):
                        return False
                return True

            split_seen = await until_all(agents, sees_split, t0=t0,
                                         timeout_s=params["detect_timeout_s"], every_s=0.25)
            views_split = await _views(agents)
            dropped = (await firewall.snapshot()).dropped(fault)
            await firewall.heal(fault)
            t0 = time.monotonic()

            async def all_alive(a: FleetAgent) -> bool:
                return len(await a.client.members_filtered(status="alive")) == n

            healed = await until_all(agents, all_alive, t0=t0,
                                     timeout_s=params["heal_timeout_s"], every_s=0.25)
            out.update(left=[a.name for a in left], right=[a.name for a in right],
                       split_s=split_seen.seen_s, split_missing=split_seen.missing,
                       views_split=views_split, dropped=dropped.packets,
                       healed_s=healed.seen_s, heal_missing=healed.missing,
                       views_healed=await _views(agents))
            return out
        finally:
            await fleet.aclose()


# ------------------------------------------------------------- the harness on raw sockets

_CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[2]))
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("connected")
except OSError as e:
    print("failed", type(e).__name__)
"""


async def _connect_as(gid: int | None, port: int, timeout_s: float = 1.0) -> str:
    argv = [sys.executable, "-I", "-S", "-c", _CONNECT, str(port), str(timeout_s)]
    if gid is not None:
        argv = group_argv(gid, argv)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


def _udp_through(port: int, count: int) -> int:
    """Datagrams sent to ``port`` (from an unwatched port) that arrived."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", port))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        rx.setblocking(False)
        got = 0
        for _ in range(count):
            tx.sendto(b"x" * 100, ("127.0.0.1", port))
            try:
                while True:
                    rx.recv(200)
                    got += 1
            except BlockingIOError:
                pass
        return got


async def harness(firewall: Firewall, params: dict[str, Any]) -> dict[str, Any]:
    """The harness on plain sockets: a fresh namespace, loss, a partition by group
    (TCP from an ephemeral port included), heal, counters."""
    with open("/proc/self/net/dev") as f:  # this namespace's (/sys/class/net: sysfs's)
        names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    out: dict[str, Any] = {"interfaces": sorted(names)}
    a_port, b_port, b2_port = 20001, 20002, 20003
    a, b = Endpoint(41001, (a_port,)), Endpoint(41002, (b_port, b2_port))
    await firewall.watch([a_port, b_port, b2_port], [a.gid, b.gid])

    fault = await firewall.loss([a_port], 30)
    before = await firewall.snapshot()
    out["udp_received"] = await asyncio.to_thread(_udp_through, a_port, 2000)
    after = await firewall.snapshot()
    out["loss_dropped"] = after.since(before).dropped(fault).packets
    out["rx_a"] = after.since(before).rx[a_port].packets
    await firewall.heal(fault)
    out["udp_received_healed"] = await asyncio.to_thread(_udp_through, a_port, 200)

    listeners = []
    for port in (a_port, b_port, b2_port):
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        listeners.append(server)
    try:
        cut = await firewall.partition([a], [b])
        out["partitioned"] = {
            "a_to_b": await _connect_as(a.gid, b_port),
            "b_to_a": await _connect_as(b.gid, a_port),
            "b_to_b": await _connect_as(b.gid, b2_port),
            "a_to_a": await _connect_as(a.gid, a_port),
            "ungrouped_to_b": await _connect_as(None, b_port),
        }
        out["partition_dropped"] = (await firewall.snapshot()).dropped(cut).packets
        await firewall.heal()
        out["healed"] = {"a_to_b": await _connect_as(a.gid, b_port),
                         "b_to_a": await _connect_as(b.gid, a_port)}
    finally:
        for server in listeners:
            server.close()
    return out
