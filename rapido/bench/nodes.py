"""Real rapido nodes (``python -m rapido serve --join ...``, ``--model none``) on fixed
ports of 127.0.0.1, for the fault tests and ``bench cluster --nodes``: meant to run
inside a namespace of :mod:`rapido.bench.netns`, where every port is free.

Each node runs under a group id of its own (:func:`rapido.bench.netns.group_argv`), and
so does everything it starts: its Serf agent child (found on PATH) inherits the group,
and so do the node's own HTTP requests to other nodes (the routing forwards creates and
claims, the proxy relays session URLs). A partition by :class:`Endpoint` (the node's
group; its HTTP and gossip ports) therefore cuts the node, its agent and its HTTP
traffic off together; the driver (no group) still reaches every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from rapido.bench.fleet import write_keyring
from rapido.bench.netns import GID_BASE, Endpoint, Firewall, group_argv

HTTP_BASE = 18000
GOSSIP_BASE = 22000
RPC_BASE = 27000


@dataclass
class Node:
    index: int
    node_id: str
    proc: subprocess.Popen[bytes]
    log: Path
    gid: int

    @property
    def http_port(self) -> int:
        return HTTP_BASE + self.index

    @property
    def gossip_port(self) -> int:
        return GOSSIP_BASE + self.index

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def bind(self) -> str:
        return f"127.0.0.1:{self.gossip_port}"

    @property
    def endpoint(self) -> Endpoint:
        """The node (and its agent, and its requests) as a partition sees it."""
        return Endpoint(self.gid, (self.http_port, self.gossip_port))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class NodeFleet:
    """Nodes ``n0``, ``n1``, ... all joining ``n0``'s gossip address, in one region."""

    workdir: Path
    firewall: Firewall | None = None
    region: str = "eu"
    reconnect_s: float | None = None
    max_streams: int = 64
    env: Mapping[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.keyring = write_keyring(self.workdir / "keyring.json")

    async def start(self, count: int, http: aiohttp.ClientSession,
                    timeout_s: float = 60.0) -> list[Node]:
        """Start ``count`` nodes and wait until each answers ``GET /api/cluster``."""
        first = len(self.nodes)
        indexes = range(first, first + count)
        if self.firewall is not None:
            await self.firewall.watch([p for i in indexes
                                       for p in (HTTP_BASE + i, GOSSIP_BASE + i)],
                                      [GID_BASE + i for i in indexes])
        seed = f"127.0.0.1:{GOSSIP_BASE}"
        new = [self._spawn(i, seed) for i in indexes]
        self.nodes.extend(new)
        await asyncio.gather(*(self._ready(n, http, timeout_s) for n in new))
        return new

    def _spawn(self, index: int, seed: str) -> Node:
        node_id = f"n{index}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAPIDO_MODEL": "none",
               "RAPIDO_LOG_LEVEL": "warning", "RAPIDO_REGION": self.region,
               "RAPIDO_RECORDINGS_DIR": str(self.workdir / "rec"),
               "RAPIDO_AVATARS_DIR": str(self.workdir / "avatars"),
               "RAPIDO_MAX_STREAMS": str(self.max_streams), **self.env}
        if self.reconnect_s is not None:
            env["RAPIDO_CLUSTER_RECONNECT_S"] = str(self.reconnect_s)
        argv = [sys.executable, "-m", "rapido", "serve", "--port", str(HTTP_BASE + index),
                "--node-id", node_id, "--join", seed,
                "--cluster-bind", f"127.0.0.1:{GOSSIP_BASE + index}",
                "--cluster-rpc-port", str(RPC_BASE + index),
                "--cluster-key-file", str(self.keyring)]
        gid = GID_BASE + index
        log = self.workdir / f"{node_id}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(group_argv(gid, argv), cwd=self.workdir, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        return Node(index, node_id, proc, log, gid)

    async def _ready(self, node: Node, http: aiohttp.ClientSession,
                     timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not node.alive:
                raise RuntimeError(f"{node.node_id} exited ({node.proc.returncode}):\n"
                                   f"{node.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{node.url}/api/cluster",
                                    timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.node_id} not answering after {timeout_s} s:\n"
                                   f"{node.tail()}")
            await asyncio.sleep(0.2)

    def kill(self, node: Node) -> None:
        """kill -9 of the node (its agent dies with it: PDEATHSIG)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    async def aclose(self) -> None:
        for n in self.nodes:
            if n.alive:
                n.proc.kill()
        for n in self.nodes:
            await asyncio.to_thread(n.proc.wait)


# ------------------------------------------------------------------------- reading


async def members(http: aiohttp.ClientSession, node: Node) -> dict[str, str]:
    """node_id -> state, as ``node`` lists its cluster ({} when it does not answer)."""
    try:
        async with http.get(f"{node.url}/api/cluster",
                            timeout=aiohttp.ClientTimeout(total=3)) as r:
            body: dict[str, Any] = await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}
    return {m["node_id"]: m["state"] for m in body.get("members", [])}


async def lists_all(http: aiohttp.ClientSession, observer: Node, states: Mapping[str, str]
                    ) -> bool:
    """Whether ``observer`` lists each of these members with this state."""
    seen = await members(http, observer)
    return all(seen.get(k) == v for k, v in states.items())


async def until(probe: Callable[[], Awaitable[bool]], timeout_s: float,
                every_s: float = 0.2) -> float | None:
    """Seconds until ``await probe()`` was true, or None after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        if await probe():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            return None
        await asyncio.sleep(every_s)


async def local_sessions(http: aiohttp.ClientSession, node: Node) -> list[dict[str, Any]]:
    """The sessions ``node`` plays itself (``GET /api/sessions``)."""
    async with http.get(f"{node.url}/api/sessions") as r:
        body: dict[str, Any] = await r.json()
    sessions: list[dict[str, Any]] = body["sessions"]
    return sessions


async def create(http: aiohttp.ClientSession, node: Node, lesson: str,
                 timeout_s: float = 10.0, headers: Mapping[str, str] | None = None
                 ) -> tuple[int, dict[str, Any]]:
    """``POST /api/sessions`` for ``lesson`` through ``node``: (status, body); status 0
    when the node did not answer."""
    try:
        async with http.post(f"{node.url}/api/sessions", json={"lesson_id": lesson},
                             headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            try:
                body = await r.json()
            except (ValueError, aiohttp.ContentTypeError):
                body = {"text": await r.text()}
            return r.status, body
    except (aiohttp.ClientError, TimeoutError) as e:
        return 0, {"error": type(e).__name__}
