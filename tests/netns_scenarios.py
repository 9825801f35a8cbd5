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

import aiohttp

from rapido.bench.fleet import Fleet, FleetAgent, until_all, watch_not_alive
from rapido.bench.netns import Endpoint, Firewall, Snapshot, group_argv
from rapido.bench.nodes import Node, NodeFleet, create, lists_all, local_sessions, members, until


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
            out = await _converged(fleet, n, timeout_s=60)
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


# ------------------------------------------------------------------------ rapido nodes


async def _closed_reason(ws: aiohttp.ClientWebSocketResponse, timeout_s: float
                         ) -> str | None:
    """The reason of the ``closed`` event ``ws`` gets within ``timeout_s`` (None: none)."""
    try:
        async with asyncio.timeout(timeout_s):
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    ev = msg.json()
                    if ev.get("type") == "closed":
                        return str(ev.get("reason"))
    except TimeoutError:
        return None
    return "socket closed without a closed event"


async def node_partition(firewall: Firewall, params: dict[str, Any]) -> dict[str, Any]:
    """4 rapido nodes (one region), cut 2 | 2 (each node with its agent and its own
    HTTP requests under the side's group): each side creates the lesson on its side, a
    WebSocket client on each session; healed, the double resolves to one session."""
    lesson = "geo"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rapido-faults-") as tmp:
        fleet = NodeFleet(Path(tmp), firewall=firewall, reconnect_s=params["reconnect_s"])
        t_start = time.monotonic()
        async with aiohttp.ClientSession() as http:
            sockets: list[aiohttp.ClientWebSocketResponse] = []
            try:
                nodes = await fleet.start(4, http)
                ids = [n.node_id for n in nodes]
                out["started_s"] = time.monotonic() - t_start
                out["converged_s"] = await until(lambda: _all_list(
                    http, nodes, dict.fromkeys(ids, "alive")), 30)
                left, right = nodes[:2], nodes[2:]
                out["left"] = [n.node_id for n in left]
                out["right"] = [n.node_id for n in right]
                fault = await firewall.partition([n.endpoint for n in left],
                                                 [n.endpoint for n in right])
                # The nodes' own HTTP to the other side is cut too (what a create would
                # forward): asked from inside a left node's group, a right node is silent.
                out["http_across"] = await _connect_as(left[0].gid, right[0].http_port)
                out["http_within"] = await _connect_as(left[0].gid, left[1].http_port)

                async def split_seen() -> bool:
                    for side, other in ((left, right), (right, left)):
                        want = {n.node_id: "failed" for n in other}
                        if not await _all_list(http, side, want):
                            return False
                    return True

                out["split_s"] = await until(split_seen, params["detect_timeout_s"], 0.5)
                out["views_split"] = {n.node_id: await members(http, n) for n in nodes}
                created = []
                for front in (left[0], right[0]):
                    created.append(await create(http, front, lesson))
                out["created"] = [[s, b.get("session_id"), b.get("node")]
                                  for s, b in created]
                for _, body in created:
                    ws = await http.ws_connect(body["ws_url"])
                    sockets.append(ws)
                    ready = await ws.receive_json(timeout=10)
                    assert ready["type"] == "ready", ready
                out["dropped"] = (await firewall.snapshot()).dropped(fault).packets
                await firewall.heal(fault)
                t_heal = time.monotonic()
                waits = [asyncio.create_task(_closed_reason(ws, params["resolve_timeout_s"]))
                         for ws in sockets]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                out["resolved_s"] = time.monotonic() - t_heal
                out["reasons"] = [w.result() if w.done() else None for w in waits]
                # The winner's socket must stay open: give it a moment to (wrongly) close.
                await asyncio.sleep(1.0)
                out["reasons_later"] = [w.result() if w.done() else None for w in waits]
                out["healed_s"] = await until(lambda: _all_list(
                    http, nodes, dict.fromkeys(ids, "alive")), 20)
                out["sessions"] = {n.node_id: [s["session_id"]
                                               for s in await local_sessions(http, n)
                                               if s["lesson_id"] == lesson]
                                   for n in nodes}
                again = []
                for n in nodes:
                    s, b = await create(http, n, lesson)
                    again.append([n.node_id, s, b.get("session_id")])
                out["again"] = again
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
            finally:
                for ws in sockets:
                    await ws.close()
                await fleet.aclose()
        out["total_s"] = time.monotonic() - t_start
    return out


async def _all_list(http: aiohttp.ClientSession, observers: list[Node],
                    states: dict[str, str]) -> bool:
    answers = await asyncio.gather(*(lists_all(http, n, states) for n in observers))
    return all(answers)
