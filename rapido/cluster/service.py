"""The cluster beside a node: its Serf agent, its tags, and its view of the members.

:class:`Cluster` starts a :class:`SerfAgent` named after the node, with the node's tags
(:func:`tags.encode`), and keeps three background tasks, each on its own RPC connection
(the agent runs one connection's commands in order, and ``join`` and ``tags`` wait for
gossip):

* ``join``: joins the configured addresses; when none answers (unreachable, wrong key)
  it logs, retries with backoff (1 s doubling to 30 s) and the node serves alone
  meanwhile, its state ``degraded`` with the reason. It stops once joined, or once
  another node has joined this one.
* ``tags``: every ``tick_s`` builds this node's :class:`NodeTags` from the ``local``
  callback (free slots, load, draining) and writes them when :class:`TagWriter` says so.
* ``view``: reads ``members()`` on every member event from the agent's stream and at
  least every ``poll_s`` anyway (the stream is about a second late and drops events for
  slow readers); each member's tags are checked (:func:`tags.decode`): a member with bad
  tags is left out of the view, counted (``on_bad_tags``) and logged once.

With ``serf_rpc`` set the agent is one the operator runs (:mod:`external`): the node
connects to it instead of starting one, checks its name, writes its tags and joins as
above; it never starts, restarts or stops that agent, and on close asks it to leave (the
agent then exits by itself).

User events (``send_event``, ``on_event``: the rollout, :mod:`rapido.cluster.release`)
and queries (``ask``, ``respond_to``) travel on the events connection; ``on_view``
listeners run after every read of the members (the scale signals).

``tags_changed()`` runs the tags task at once (the node started draining), and
:class:`TagWriter` writes a change of the draining tag without waiting out its interval:
no other node places a lesson on a draining one for longer than the gossip takes.

A fifth task, ``agent``, watches the agent: when its process exits or one of its RPC
connections breaks, the node keeps serving its own lessons, shows ``degraded`` with the
reason, and the agent is stopped and started again (same settings and node name, a fresh
RPC token) with backoff (1 s doubling to 30 s, back to 1 s once an agent lived 30 s),
counted (``on_restart``); the new agent gets fresh connections and tasks, joins the
``join`` addresses again and has its tags written at once; the state is ``ok`` again once
joined. Meanwhile the view is the last one read. An agent the operator runs is not
restarted but reconnected to, with the same backoff, until it answers again.

Why one module over 500 lines: the three tasks share one agent, its RPC connections and
the view they keep; the protocol pieces (tags, placement, Serf RPC) are modules of their own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from rapido.aio import cancel_and_wait
from rapido.cluster.agent import SerfAgent, SerfAgentConfigError, SerfAgentSettings
from rapido.cluster.external import ExternalAgentSettings, ExternalSerfAgent
from rapido.cluster.health import NO_HEALTH, Health
from rapido.cluster.placement import MemberView
from rapido.cluster.serf import (
    QueryEvent,
    QueryResponse,
    SerfClient,
    SerfError,
    SerfStreamOverflow,
    UserEvent,
)
from rapido.cluster.tags import (
    KEYS,
    NodeTags,
    Peer,
    TagError,
    TagWriter,
    decode,
    encode,
    tag_interval,
)

log = logging.getLogger(__name__)

#: How far back the views are kept (a lesson's records live as long), and how many.
HISTORY_S: Final = 3600.0
HISTORY_MAX: Final = 256
#: Answers a query's payload with a response payload, or ``None`` to stay silent.
Responder = Callable[[bytes], bytes | None]
#: Takes a user event of the name it was registered for (on the event loop).
EventHandler = Callable[[UserEvent], None]

MEMBER_EVENTS: Final = ("member-join", "member-leave", "member-failed", "member-update",
                        "member-reap")


@dataclass(frozen=True)
class LocalState:
    """What the node reports of itself every tick (the wiring reads the engine)."""

    free_slots: int
    load: float
    draining: bool
    streams: int = 0
    memory: float | None = None
    gpu_memory: float | None = None
    health: Health = NO_HEALTH
    rollout_epoch: int = 0


@dataclass(frozen=True)
class ClusterSettings:
    join: tuple[str, ...]
    bind: str
    rpc_port: int
    keyring_file: Path | None
    region: str
    location: tuple[float, float] | None
    version: str
    capacity: int
    profile: str  # Serf's timing profile: "lan" within a region, "wan" across regions
    #: Serf's reconnect interval (a healed partition rejoins only through it); None:
    #: Serf's own 30 s.
    reconnect_interval_s: float | None = None
    #: host:port of the RPC of an agent the operator runs; empty: start our own.
    serf_rpc: str = ""
    serf_rpc_auth: str | None = field(default=None, repr=False)
    binary: str = "serf"
    tick_s: float = 1.0
    poll_s: float = 2.0
    join_backoff_s: tuple[float, float] = (1.0, 30.0)
    restart_backoff_s: tuple[float, float] = (1.0, 30.0)


class Cluster:
    """``await start(node_id, url)`` once the node's URL is known; ``view()`` is the
    members (this node included) whose tags could be read; ``aclose()`` leaves."""

    def __init__(self, settings: ClusterSettings, local: Callable[[], LocalState], *,
                 on_bad_tags: Callable[[], None] = lambda: None,
                 on_restart: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self._local = local
        self._on_bad_tags = on_bad_tags
        self._on_restart = on_restart
        self.node_id = ""
        self.url = ""
        self.agent: SerfAgent | ExternalSerfAgent | None = None
        self.joined = False
        self._join_error: str | None = None
        self._rpc_error: str | None = None
        self._peers: list[Peer] = []
        self._bad: set[str] = set()  # members whose bad tags were logged
        self._writer = TagWriter()
        self._refresh = asyncio.Event()
        self._tags_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[SerfClient] = []
        self._trouble = asyncio.Event()  # the agent exited or an RPC connection broke
        self._supervisor: asyncio.Task[None] | None = None
        self._agent_started = 0.0
        self.restarts = 0
        self.tag_timeouts = 0  # tag writes the agent took but could not broadcast in time
        #: When the set of alive members last changed (monotonic s; a node that just
        #: started counts as a change: it has no records of anyone's lessons yet).
        self.view_changed_at: float | None = None
        #: When this node first read the members (monotonic s): before, it knew nothing.
        self.started_at: float | None = None
        #: The views (alive, non-draining members) in effect over the last hour, oldest
        #: first, each with the time it began: who was a lesson's home meanwhile.
        self.history: collections.deque[tuple[float, tuple[MemberView, ...]]] = \
            collections.deque()
        self._alive: frozenset[str] = frozenset()
        self._listeners: list[Callable[[], None]] = []
        self._responders: dict[str, Responder] = {}
        self._handlers: dict[str, EventHandler] = {}
        self._view_listeners: list[Callable[[], None]] = []

    # -- reading ----------------------------------------------------------------------

    def view(self) -> list[Peer]:
        return list(self._peers)

    def peer(self, node_id: str) -> Peer | None:
        return next((p for p in self._peers if p.view.node_id == node_id), None)

    def on_change(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs whenever the set of alive members changes."""
        self._listeners.append(listener)

    def on_view(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs after every read of the members (a second or two apart)."""
        self._view_listeners.append(listener)

    def respond_to(self, name: str, responder: Responder) -> None:
        """Answer the cluster's queries called ``name`` (register before ``start``)."""
        self._responders[name] = responder

    def on_event(self, name: str, handler: EventHandler) -> None:
        """Take the cluster's user events called ``name``, this node's own included
        (register before ``start``)."""
        self._handlers[name] = handler

    async def ask(self, name: str, payload: bytes, timeout_s: float,
                  nodes: tuple[str, ...] = ()) -> list[QueryResponse]:
        """A Serf query to every member (or to ``nodes``); the answers that came within
        ``timeout_s`` (the agent waits it out in full). Raises SerfError when the agent
        cannot be asked."""
        agent = self.agent
        if agent is None or len(self._clients) < 2:
            raise SerfError("ask", "the serf agent is not running")
        query = await self._clients[1].query(name, payload, timeout_s=timeout_s,
                                             filter_nodes=nodes)
        return await query.responses()

    async def send_event(self, name: str, payload: bytes) -> None:
        """A user event to every member (this one too), never coalesced. Raises
        SerfError when the agent cannot take it, ValueError when it is too large."""
        if self.agent is None or len(self._clients) < 2:
            raise SerfError("event", "the serf agent is not running")
        await self._clients[1].event(name, payload, coalesce=False)

    def local_tags(self) -> NodeTags:
        s = self.settings
        state = self._local()
        return NodeTags(node_id=self.node_id, url=self.url, region=s.region,
                        location=s.location, version=s.version, capacity=s.capacity,
                        free_slots=max(0, min(s.capacity, state.free_slots)),
                        load=state.load, draining=state.draining, streams=state.streams,
                        memory=state.memory, gpu_memory=state.gpu_memory,
                        health=state.health, rollout_epoch=state.rollout_epoch)

    @property
    def error(self) -> str | None:
        """Why the cluster is degraded, if it is for a reason of this node's own."""
        return self._rpc_error or self._join_error

    @property
    def state(self) -> str:
        """``ok``, or ``degraded`` (alone after failed joins, the agent gone, a member
        failed)."""
        if self.error is not None or not self.joined:
            return "degraded"
        if any(p.view.status == "failed" for p in self._peers):
            return "degraded"
        return "ok"

    @property
    def external(self) -> bool:
        """Whether the agent is one the operator runs (``serf_rpc``)."""
        return bool(self.settings.serf_rpc)

    def tags_changed(self) -> None:
        """This node's state changed in a way the others must see now (it started
        draining): its tags are looked at now rather than at the next tick."""
        self._tags_now.set()

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, node_id: str, url: str) -> None:
        self.node_id, self.url = node_id, url
        await self._start_agent(first=True)
        self._supervisor = asyncio.create_task(self._supervise(),
                                               name=f"cluster-agent {node_id}")

    async def aclose(self, leave: bool = True) -> None:
        """Stop the tasks (a restart under way included), leave the cluster gracefully,
        stop the agent."""
        await cancel_and_wait([self._supervisor])
        self._supervisor = None
        await self._stop_agent(leave=leave)

    async def _start_agent(self, first: bool = False) -> None:
        """Start an agent with this node's tags now, connect, read the members and start
        the tasks; on any failure (or cancellation) nothing of it is left running."""
        s = self.settings
        tags = encode(self.local_tags())
        agent: SerfAgent | ExternalSerfAgent
        if self.external:
            agent = ExternalSerfAgent(ExternalAgentSettings(
                node=self.node_id, rpc_addr=s.serf_rpc, rpc_auth=s.serf_rpc_auth,
                tags=tags, owned_tags=KEYS))
        else:
            agent = SerfAgent(SerfAgentSettings(
                node=self.node_id, bind=s.bind, rpc_port=s.rpc_port,
                keyring_file=s.keyring_file, tags=tags, binary=s.binary,
                profile=s.profile, reconnect_interval_s=s.reconnect_interval_s))
        self.agent = agent  # before start(): aclose() stops it whatever happens
        self.joined = False
        self._join_error = None
        self._trouble.clear()
        self._writer = TagWriter()  # after a restart: the tags are written at once
        try:
            await agent.start()  # an external agent gets the tags here, ours from its config
            self._agent_started = time.monotonic()
            if first:
                self._writer.wrote(tags, self._agent_started)
            slow = await agent.connect()  # join and tags: both wait for gossip
            self._clients.append(slow)
            events = await agent.connect()
            self._clients.append(events)
            await self._read_members()
        except BaseException:
            await self._stop_agent(leave=False)
            raise
        node_id = self.node_id
        self._tasks = [
            asyncio.create_task(self._join_loop(slow), name=f"cluster-join {node_id}"),
            asyncio.create_task(self._tags_loop(slow), name=f"cluster-tags {node_id}"),
            asyncio.create_task(self._events_loop(events), name=f"cluster-events {node_id}"),
            asyncio.create_task(self._view_loop(), name=f"cluster-view {node_id}"),
            asyncio.create_task(self._watch(agent), name=f"cluster-watch {node_id}"),
        ]

    async def _stop_agent(self, leave: bool) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        for client in self._clients:
            await client.aclose()
        self._clients = []
        if self.agent is not None:
            await self.agent.aclose(leave=leave)
            self.agent = None  # only once it is stopped: a cancelled stop is redone

    async def _supervise(self) -> None:
        """Restart the agent with backoff whenever it is in trouble."""
        first, most = self.settings.restart_backoff_s
        delay = first
        while True:
            await self._trouble.wait()
            why = self._rpc_error or "the serf agent's RPC broke"
            if time.monotonic() - self._agent_started >= most:
                delay = first
            await self._stop_agent(leave=False)
            redo = (f"reconnecting to the serf agent at {self.settings.serf_rpc}"
                    if self.external else "restarting the agent")
            while True:
                self._rpc_error = f"{why}; {redo} in {delay:g} s"
                log.warning("cluster: %s", self._rpc_error)
                await asyncio.sleep(delay)
                delay = min(most, delay * 2)
                self.restarts += 1
                self._on_restart()
                try:
                    await self._start_agent()
                except (SerfError, SerfAgentConfigError, OSError) as exc:
                    why = f"{redo}: {exc}"
                    continue
                break
            self._rpc_error = None
            if self.external:
                log.warning("cluster: reconnected to the serf agent at %s, joining again",
                            self.settings.serf_rpc)
            else:
                log.warning("cluster: serf agent restarted (pid %s), joining again",
                            self.agent.pid if self.agent is not None else None)

    # -- the tasks --------------------------------------------------------------------

    async def _join_loop(self, client: SerfClient) -> None:
        own = self.agent.bind if isinstance(self.agent, ExternalSerfAgent) \
            else self.settings.bind
        addrs = [a for a in self.settings.join if a != own]
        if not addrs:  # only our own address: the first node of a cluster
            self.joined = True
            return
        delay, most = self.settings.join_backoff_s
        while not self.joined:
            if sum(p.view.status == "alive" for p in self._peers) > 1:
                self.joined = True  # another node joined us
                break
            try:
                n = await client.join(addrs)
            except SerfError as exc:
                self._join_error = f"cannot join {', '.join(addrs)}: {exc}"
                log.warning("cluster: %s; serving alone, retrying in %.0f s",
                            self._join_error, delay)
                await asyncio.sleep(delay)
                delay = min(most, delay * 2)
                continue
            log.info("cluster: joined through %d of %s", n, ", ".join(addrs))
            self.joined = True
        self._join_error = None
        self._refresh.set()

    async def _tags_loop(self, client: SerfClient) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.tick_s):
                    await self._tags_now.wait()
            self._tags_now.clear()
            try:
                tags = encode(self.local_tags())
            except ValueError as exc:  # pragma: no cover - checked at start
                log.error("cluster: this node's tags: %s", exc)
                continue
            now = time.monotonic()
            self._writer.min_interval_s = tag_interval(len(self._alive))
            due = self._writer.due(tags, now)
            if due is None:
                continue
            try:
                await client.tags(set=due, delete=[k for k in KEYS if k not in due])
            except SerfError as exc:
                if client.closed:
                    self._agent_trouble(f"writing tags: {exc}")
                else:
                    # The agent took the tags but timed out waiting for their broadcast
                    # (a busy cluster: many tag changes at once). They still spread; the
                    # node is not in trouble for it. Written again at the next change.
                    self.tag_timeouts += 1
                    log.log(logging.WARNING if self.tag_timeouts == 1 else logging.DEBUG,
                            "cluster: writing tags: %s (the agent is busy; not trouble)",
                            exc)
                    self._writer.wrote(due, now)
                continue
            self._writer.wrote(due, now)

    async def _events_loop(self, client: SerfClient) -> None:
        kinds = (*MEMBER_EVENTS, *(f"query:{name}" for name in self._responders),
                 *(f"user:{name}" for name in self._handlers))
        while True:
            try:
                async with await client.stream(kinds) as stream:
                    async for event in stream:
                        if isinstance(event, QueryEvent):
                            await self._answer(client, event)
                        elif isinstance(event, UserEvent):
                            self._take(event)
                        else:
                            self._refresh.set()
            except SerfStreamOverflow:
                self._refresh.set()  # events were lost: read the members, subscribe again
                continue
            except SerfError as exc:
                self._agent_trouble(f"member events: {exc}")
            return  # the connection is gone; the view loop keeps polling

    async def _view_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_s):
                    await self._refresh.wait()
            self._refresh.clear()
            try:
                await self._read_members()
            except SerfError as exc:
                self._agent_trouble(f"reading members: {exc}")
            else:
                self._rpc_error = None

    async def _answer(self, client: SerfClient, event: QueryEvent) -> None:
        responder = self._responders.get(event.name)
        if responder is None:
            return
        try:
            payload = responder(event.payload)
        except Exception:
            log.exception("cluster: answering query %r", event.name)
            return
        if payload is not None:
            # A query that timed out meanwhile is refused by the agent; nothing to do.
            with contextlib.suppress(SerfError):
                await client.respond(event.id, payload)

    def _take(self, event: UserEvent) -> None:
        handler = self._handlers.get(event.name)
        if handler is None:
            return
        try:
            handler(event)
        except Exception:
            log.exception("cluster: taking user event %r", event.name)

    async def _read_members(self) -> None:
        assert self.agent is not None and self.agent.client is not None
        members = await self.agent.client.members()
        peers: list[Peer] = []
        for m in members:
            try:
                peer = decode(m.name, m.status, m.tags)
            except TagError as exc:
                self._on_bad_tags()
                if m.name not in self._bad:
                    self._bad.add(m.name)
                    log.warning("cluster: member %r left out of the view: %s", m.name, exc)
                continue
            peers.append(peer)
        self._peers = sorted(peers, key=lambda p: p.view.node_id)
        for each in self._view_listeners:
            try:
                each()
            except Exception:
                log.exception("cluster: a view listener failed")
        alive = frozenset(p.view.node_id for p in peers if p.view.status == "alive"
                          and not p.view.draining)
        if alive != self._alive or self.view_changed_at is None:
            self._alive = alive
            now = time.monotonic()
            self.view_changed_at = now
            if self.started_at is None:
                self.started_at = now
            self.history.append((now, tuple(p.view for p in peers)))
            while len(self.history) > 1 and (self.history[1][0] <= now - HISTORY_S
                                             or len(self.history) > HISTORY_MAX):
                self.history.popleft()
            for listener in self._listeners:
                try:
                    listener()
                except Exception:
                    log.exception("cluster: a view listener failed")

    async def _watch(self, agent: SerfAgent | ExternalSerfAgent) -> None:
        await agent.wait()
        if isinstance(agent, ExternalSerfAgent):
            self._agent_trouble(f"the serf agent at {agent.rpc_addr} closed its RPC "
                                "connection")
        else:
            self._agent_trouble("the serf agent exited")

    def _agent_trouble(self, what: str) -> None:
        """Degraded for ``what``; a restart when the agent exited or a connection broke
        (a refused or timed-out command on a live connection is not reason enough)."""
        agent = self.agent
        if agent is not None and agent.returncode is not None:
            what = f"the serf agent exited with {agent.returncode}"
        if self._trouble.is_set() and (agent is None or agent.returncode is None):
            return  # a restart is on its way; a broken connection says no more
        if self._rpc_error != what:
            log.error("cluster: %s", what)
        self._rpc_error = what
        clients = [*self._clients, *([agent.client] if agent and agent.client else [])]
        if agent is not None and (agent.returncode is not None or
                                  any(c.closed for c in clients)):
            self._trouble.set()
