"""Many Serf agents on one machine, for the cluster benchmark and the fault tests: each
a real ``serf agent`` started through :class:`SerfAgent` (LAN profile, one shared
encryption keyring, rapido's tags), on fixed ports of 127.0.0.1: meant to run inside a
namespace of :mod:`rapido.bench.netns`, where every port is free and the agents' ports
are watched by the firewall (counted; each agent sends under a group id of its own, so
a partition can cut it off).

Reading the agents is the expensive part on a small machine (a ``members`` answer of
100 members is ~30 KB of msgpack, parsed in Python): every read here is a
``members-filtered`` query that the agent answers with the few members asked about,
on one RPC connection per agent, reused (a second one, ``slow``, for ``tags`` and
``join``, which wait for gossip and would hold the reads back).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rapido import __version__
from rapido.bench.netns import GID_BASE, Endpoint, Firewall, grouped_binary
from rapido.cluster.agent import SerfAgent, SerfAgentSettings
from rapido.cluster.serf import MemberEvent, SerfClient, SerfError
from rapido.cluster.tags import NodeTags, encode

GOSSIP_BASE = 21000
RPC_BASE = 26000
MAX_AGENTS = 5000  # the port ranges above stay below the ephemeral range (32768)
#: A member's status other than alive, as a members-filtered regex (Serf anchors it).
NOT_ALIVE = "(none|leaving|left|failed)"


def node_name(index: int) -> str:
    return f"agent-{index:03d}"


def rapido_tags(index: int, load: float = 0.0) -> dict[str, str]:
    """Tags as a rapido node writes them (tags.encode), for agent ``index``."""
    return encode(NodeTags(node_id=node_name(index), url=f"http://127.0.0.1:{8000 + index}",
                           region="eu-west", location=(48.8566, 2.3522),
                           version=__version__, capacity=32, free_slots=32, load=load))


def write_keyring(path: Path) -> Path:
    path.write_text(json.dumps([base64.b64encode(os.urandom(32)).decode()]))
    path.chmod(0o600)
    return path


@dataclass
class FleetAgent:
    index: int
    agent: SerfAgent
    gid: int | None
    slow_client: SerfClient | None = None

    @property
    def name(self) -> str:
        return self.agent.settings.node

    @property
    def bind(self) -> str:
        return self.agent.settings.bind

    @property
    def port(self) -> int:
        return GOSSIP_BASE + self.index

    @property
    def client(self) -> SerfClient:
        assert self.agent.client is not None, "agent not started"
        return self.agent.client

    @property
    def endpoint(self) -> Endpoint:
        """This agent as a partition sees it."""
        if self.gid is None:
            raise ValueError(f"{self.name} runs without a group id: it cannot be cut off")
        return Endpoint(self.gid, (self.port,))

    async def slow(self) -> SerfClient:
        """A second connection for commands that wait for gossip (tags, join)."""
        if self.slow_client is None or self.slow_client.closed:
            self.slow_client = await self.agent.connect()
        return self.slow_client

    @property
    def alive(self) -> bool:
        return self.agent.returncode is None


@dataclass
class Fleet:
    """Agents started in order (``agent-000`` first, the seed of joins)."""

    workdir: Path
    firewall: Firewall | None = None
    #: Each agent under a group id of its own (needed for partitions).
    grouped: bool = True
    profile: str = "lan"
    reconnect_interval_s: float | None = None
    binary: str = "serf"
    log_level: str = "err"
    agents: list[FleetAgent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.keyring = write_keyring(self.workdir / "keyring.json")

    async def start(self, count: int, parallel: int = 8) -> list[FleetAgent]:
        """Start ``count`` more agents (not joined), ``parallel`` at a time; their ports
        and groups are registered with the firewall first."""
        first = len(self.agents)
        if first + count > MAX_AGENTS:
            raise ValueError(f"at most {MAX_AGENTS} agents")
        indexes = range(first, first + count)
        gids = [GID_BASE + i for i in indexes] if self.grouped else []
        if self.firewall is not None:
            await self.firewall.watch([GOSSIP_BASE + i for i in indexes], gids)
        new = [self._make(i) for i in indexes]
        self.agents.extend(new)
        gate = asyncio.Semaphore(parallel)

        async def one(a: FleetAgent) -> None:
            async with gate:
                await a.agent.start()

        await asyncio.gather(*(one(a) for a in new))
        return new

    def _make(self, index: int) -> FleetAgent:
        gid = GID_BASE + index if self.grouped else None
        binary = self.binary
        if gid is not None:
            binary = str(grouped_binary(gid, self.binary, self.workdir))
        settings = SerfAgentSettings(
            node=node_name(index), bind=f"127.0.0.1:{GOSSIP_BASE + index}",
            rpc_port=RPC_BASE + index, keyring_file=self.keyring, tags=rapido_tags(index),
            profile=self.profile, log_level=self.log_level, binary=binary,
            reconnect_interval_s=self.reconnect_interval_s, stop_timeout_s=4.0,
            start_timeout_s=30.0)
        return FleetAgent(index, SerfAgent(settings), gid)

    async def join(self, agents: Sequence[FleetAgent], seed: FleetAgent | None = None,
                   parallel: int = 16) -> None:
        """Every agent joins the seed (agent-000 by default), ``parallel`` at a time."""
        target = (seed or self.agents[0]).bind
        gate = asyncio.Semaphore(parallel)

        async def one(a: FleetAgent) -> None:
            if a.bind == target:
                return
            async with gate:
                await (await a.slow()).join([target])

        await asyncio.gather(*(one(a) for a in agents))

    def kill(self, agent: FleetAgent) -> None:
        """kill -9 of the agent's process (the others will see it fail)."""
        assert agent.agent.pid is not None
        os.kill(agent.agent.pid, signal.SIGKILL)

    def live(self) -> list[FleetAgent]:
        return [a for a in self.agents if a.alive]

    def pids(self) -> list[int]:
        return [a.agent.pid for a in self.live() if a.agent.pid is not None]

    async def aclose(self) -> None:
        for a in self.agents:
            if a.slow_client is not None:
                await a.slow_client.aclose()
        await asyncio.gather(*(a.agent.aclose(leave=False) for a in self.agents),
                             return_exceptions=True)


# ------------------------------------------------------------------------------ reading


def exact(name: str) -> str:
    return re.escape(name)


async def lists(observer: FleetAgent, name: str, status: str = "alive",
                tags: dict[str, str] | None = None) -> bool:
    """Whether ``observer`` lists member ``name`` with this status (a regex) and tags
    (exact values)."""
    found = await observer.client.members_filtered(
        name=exact(name), status=status,
        tags={k: re.escape(v) for k, v in (tags or {}).items()})
    return bool(found)


async def not_alive(observer: FleetAgent) -> list[tuple[str, str]]:
    """(name, status) of every member ``observer`` lists as anything but alive."""
    return [(m.name, m.status) for m in await observer.client.members_filtered(
        status=NOT_ALIVE)]


async def alive_count(observer: FleetAgent) -> int:
    return len(await observer.client.members_filtered(status="alive"))


@dataclass
class Spread:
    """When each observer first answered true, in seconds after ``t0``."""

    seen_s: dict[str, float]
    missing: list[str]
    rounds: int
    #: The longest round of reads: the resolution of the figures.
    round_s: float

    @property
    def all_s(self) -> float | None:
        return None if self.missing else max(self.seen_s.values(), default=0.0)

    @property
    def median_s(self) -> float | None:
        values = sorted(self.seen_s.values())
        return values[len(values) // 2] if values else None


async def until_all(observers: Sequence[FleetAgent],
                    probe: Callable[[FleetAgent], Awaitable[bool]], *, t0: float,
                    timeout_s: float, every_s: float = 0.1, parallel: int = 32) -> Spread:
    """Ask every observer (``parallel`` reads at a time) in rounds, ``every_s`` apart,
    until each has answered true once (or ``timeout_s`` after ``t0``). An observer
    that cannot be read (its agent died) counts as not seeing."""
    pending = {a.name: a for a in observers}
    seen: dict[str, float] = {}
    gate = asyncio.Semaphore(parallel)
    rounds, worst = 0, 0.0

    async def ask(a: FleetAgent) -> None:
        async with gate:
            try:
                ok = await probe(a)
            except SerfError:
                return
        if ok:
            seen[a.name] = time.monotonic() - t0
            pending.pop(a.name, None)

    while pending and time.monotonic() - t0 < timeout_s:
        started = time.monotonic()
        await asyncio.gather(*(ask(a) for a in list(pending.values())))
        rounds += 1
        worst = max(worst, time.monotonic() - started)
        if pending:
            await asyncio.sleep(every_s)
    return Spread(seen, sorted(pending), rounds, worst)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes used so far (those still there)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


@dataclass
class Watch:
    """What :func:`watch_not_alive` saw."""

    #: Reads that listed a member not alive (one per member listed).
    observations: int = 0
    #: (observer, member, status) of every such listing.
    seen: set[tuple[str, str, str]] = field(default_factory=set)
    #: member-failed / member-leave events from the agents' streams.
    events: list[dict[str, object]] = field(default_factory=list)
    reads: int = 0
    unreadable: int = 0
    seconds: float = 0.0

    @property
    def not_alive(self) -> int:
        return self.observations + len(self.events)

    def json(self) -> dict[str, object]:
        return {"observations": self.observations, "events": self.events[:50],
                "event_count": len(self.events), "seen": sorted(map(list, self.seen)),
                "reads": self.reads, "unreadable": self.unreadable,
                "seconds": self.seconds, "not_alive": self.not_alive}


async def watch_not_alive(agents: Sequence[FleetAgent], seconds: float, *,
                          every_s: float = 0.5, sample: int | None = None,
                          started: Callable[[], Awaitable[None]] | None = None) -> Watch:
    """For ``seconds``, every ``every_s`` read ``sample`` agents in turn (all by default)
    for members listed as anything but alive, and follow every agent's member-failed
    and member-leave events (the stream is ~1 s late, so it is read 1.5 s longer).
    ``started`` is awaited once the streams are registered (to start a fault then)."""
    watch = Watch()
    n = len(agents)
    k = n if sample is None else max(1, min(n, sample))
    t0 = time.monotonic()

    async def follow(a: FleetAgent) -> None:
        async with await a.client.stream(["member-failed", "member-leave"]) as stream:
            async for event in stream:
                if isinstance(event, MemberEvent):
                    for m in event.members:
                        watch.events.append({"observer": a.name, "member": m.name,
                                             "event": event.type,
                                             "at_s": round(time.monotonic() - t0, 2)})

    followers = [asyncio.create_task(follow(a)) for a in agents]
    try:
        await asyncio.sleep(0.2)  # the stream commands are acked
        if started is not None:
            await started()
        t0 = time.monotonic()
        cursor = 0
        while time.monotonic() - t0 < seconds:
            tick = time.monotonic()
            batch = [agents[(cursor + i) % n] for i in range(k)]
            cursor = (cursor + k) % n
            answers = await asyncio.gather(*(not_alive(a) for a in batch),
                                           return_exceptions=True)
            for a, answer in zip(batch, answers, strict=True):
                watch.reads += 1
                if isinstance(answer, BaseException):
                    watch.unreadable += 1
                    continue
                for name, status in answer:
                    watch.observations += 1
                    watch.seen.add((a.name, name, status))
            await asyncio.sleep(max(0.0, every_s - (time.monotonic() - tick)))
        watch.seconds = time.monotonic() - t0
        await asyncio.sleep(1.5)
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    return watch
