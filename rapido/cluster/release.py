"""The rollout on a clustered node: its state spread over Serf, and the automatic rollback.

* Every change of the rollout (start, abort, rollback) is a Serf user event
  (:data:`~rapido.cluster.rollout.EVENT`); each node applies it with the event's Lamport
  time as the state's epoch (:func:`~rapido.cluster.rollout.apply_event`: the latest
  wins, stale and duplicate ends change nothing). The node's tags carry that epoch
  (``ro``): a node that joins or restarts later, or missed events in a partition, sees a
  peer with a newer epoch and asks that peer for its state (the Serf query
  :data:`STATE_QUERY`), then adopts it.
* Every second the node evaluates the rollback rule
  (:func:`~rapido.cluster.health.rollback_reason`) on the health the new version's nodes
  gossip (its own figures read fresh). A node whose own figures break the rule publishes
  the rollback at once; any other node that decides holds off ``hold_off_s`` plus
  ``rank_step_s`` per place in the order of node ids, and publishes only if no rollback
  arrived meanwhile: the first to decide publishes, so there is one event (and should
  two cross, the second is ignored). Every node logs the rollback it applies once and
  counts it (``on_rollback``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import orjson

from rapido.aio import cancel_and_wait
from rapido.cluster.health import Health, rollback_reason
from rapido.cluster.rollout import (
    EVENT,
    ROLLED_BACK,
    RUNNING,
    Phase,
    RolloutState,
    apply_event,
    end_event,
    start_event,
    state_from_json,
)
from rapido.cluster.serf import SerfError, UserEvent
from rapido.cluster.service import Cluster
from rapido.cluster.tags import Peer

log = logging.getLogger(__name__)

#: The Serf query a node asks a peer whose rollout epoch is newer than its own.
STATE_QUERY: Final = "rapido-rollout-state"


@dataclass(frozen=True)
class ReleaseSettings:
    version: str  # this node's
    tick_s: float = 1.0
    hold_off_s: float = 2.0
    rank_step_s: float = 0.5
    fetch_timeout_s: float = 1.0
    #: How long ``start``/``abort`` wait for their own event to come back.
    applied_timeout_s: float = 5.0


class Release:
    def __init__(self, settings: ReleaseSettings, cluster: Cluster,
                 local_health: Callable[[], Health], *,
                 on_rollback: Callable[[], None] = lambda: None,
                 on_percent: Callable[[int], None] = lambda p: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.cluster = cluster
        self._health = local_health
        self._on_rollback = on_rollback
        self._on_percent = on_percent
        self._clock = clock
        self.state = RolloutState()
        self.events: Counter[str] = Counter()  # rollout events taken, by op
        self.rejected = 0  # malformed events and peers' states
        self._changed = asyncio.Event()
        self._decided: tuple[str, float, str] | None = None  # (rollout id, due, reason)
        self._fetching = False
        self._task: asyncio.Task[None] | None = None
        cluster.on_event(EVENT, self._take)
        cluster.respond_to(STATE_QUERY, self._answer)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(),
                                         name=f"release {self.cluster.node_id}")

    async def aclose(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    # -- reading ------------------------------------------------------------------------

    def now(self) -> RolloutState:
        """The state as of now (``running`` turns ``complete`` after its last phase)."""
        return self.state.at(self._clock())

    def to_json(self) -> dict[str, object]:
        return self.state.to_json(self._clock())

    def versions(self) -> set[str]:
        """The versions alive members run (this node's included)."""
        return {p.view.version for p in self.cluster.view() if p.view.status == "alive"} \
            | {self.settings.version}

    def new_version_for(self, user: str) -> tuple[str, bool] | None:
        """``(version, True)`` when ``user``'s new session goes to a node of the
        rollout's version, ``(version, False)`` to a node of another; None: anywhere."""
        state = self.state
        want = state.new_version_for(user, self._clock())
        return None if want is None else (state.version, want)

    # -- changing it --------------------------------------------------------------------

    async def start_rollout(self, version: str, phases: tuple[Phase, ...]) -> RolloutState:
        rid = secrets.token_hex(8)
        payload = start_event(rid, version, phases, self._clock(), self.cluster.node_id)
        return await self._send(payload, lambda s: s.id == rid)

    async def abort(self) -> RolloutState | None:
        """End the running rollout (0 %); None when none runs."""
        state = self.now()
        if not state.active:
            return None
        payload = end_event("abort", state.id, self._clock(), self.cluster.node_id,
                            "aborted by an operator")
        return await self._send(payload, lambda s: s.id == state.id and not s.active)

    async def _send(self, payload: bytes, applied: Callable[[RolloutState], bool]
                    ) -> RolloutState:
        """Send the event and wait (briefly) until it came back and was applied here."""
        await self.cluster.send_event(EVENT, payload)
        deadline = time.monotonic() + self.settings.applied_timeout_s
        while not applied(self.state) and time.monotonic() < deadline:
            self._changed.clear()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._changed.wait()
            except TimeoutError:
                break
        return self.state

    # -- from the cluster ---------------------------------------------------------------

    def _take(self, event: UserEvent) -> None:
        try:
            op = orjson.loads(event.payload).get("op")
            new = apply_event(self.state, event.payload, event.ltime)
        except (ValueError, AttributeError) as exc:
            self.rejected += 1
            log.warning("rollout: an event that cannot be read (ltime %d): %s", event.ltime,
                        exc)
            return
        self.events[str(op)] += 1
        if new is not None:
            self._adopt(new, "event")

    def _adopt(self, new: RolloutState, how: str) -> None:
        old = self.state
        self.state = new
        self._changed.set()
        if new.state == ROLLED_BACK and (old.id != new.id or old.state != ROLLED_BACK):
            self._on_rollback()
            log.warning("rollout %s of version %s rolled back by %s: %s", new.id,
                        new.version, new.by, new.reason)
        elif new.id != old.id and new.state == RUNNING:
            log.warning("rollout %s of version %s started by %s (%s): phases %s", new.id,
                        new.version, new.by, how,
                        ", ".join(f"{p.percent}% {p.duration_s:g}s" for p in new.phases))
        elif new.state != old.state or new.id != old.id:
            log.warning("rollout %s of version %s: %s (%s)", new.id, new.version, new.state,
                        how)

    def _answer(self, payload: bytes) -> bytes | None:
        return orjson.dumps(self.state.to_json()) if self.state.epoch else None

    async def _fetch(self, node: str) -> None:
        """Ask ``node`` (whose epoch is newer) for its state."""
        try:
            answers = await self.cluster.ask(STATE_QUERY, b"", self.settings.fetch_timeout_s,
                                             nodes=(node,))
        except (SerfError, ValueError) as exc:
            log.info("rollout: asking %s for its state failed: %s", node, exc)
            return
        for a in answers:
            try:
                state = state_from_json(orjson.loads(a.payload))
            except (ValueError, orjson.JSONDecodeError) as exc:
                self.rejected += 1
                log.warning("rollout: %s sent a state that cannot be read: %s", a.from_node,
                            exc)
                continue
            if state.epoch > self.state.epoch:
                self._adopt(state, f"from {a.from_node}")

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_s)
            try:
                await self._tick()
            except Exception:
                log.exception("rollout: a tick failed")

    async def _tick(self) -> None:
        now = self._clock()
        state = self.state.at(now)
        self._on_percent(state.percent(now))
        peers = [p for p in self.cluster.view() if p.view.status == "alive"
                 and p.view.node_id != self.cluster.node_id]
        newer = max(peers, key=lambda p: p.rollout_epoch, default=None)
        if newer is not None and newer.rollout_epoch > self.state.epoch and not self._fetching:
            self._fetching = True
            try:
                await self._fetch(newer.view.node_id)
            finally:
                self._fetching = False
            state = self.state.at(now)
        if state.state != RUNNING:
            self._decided = None
            return
        own = self._health()
        mine = self.settings.version == state.version
        new = [p.health for p in peers if p.view.version == state.version]
        old = [p.health for p in peers if p.view.version != state.version]
        (new if mine else old).append(own)
        reason = rollback_reason(new, old)
        if reason is None and self._decided is None:
            return
        if self._decided is None or self._decided[0] != state.id:
            assert reason is not None
            own_fault = mine and rollback_reason([own], old) is not None
            wait = 0.0 if own_fault else self._hold_off(peers)
            self._decided = (state.id, time.monotonic() + wait, reason)
            log.info("rollout %s: the rule says roll back (%s); publishing in %.1f s "
                     "unless another node does", state.id, reason, wait)
        rid, due, why = self._decided
        if time.monotonic() < due:
            return
        try:
            await self.cluster.send_event(EVENT, end_event(
                "rollback", rid, self._clock(), self.cluster.node_id, why))
        except (SerfError, ValueError) as exc:
            log.warning("rollout %s: publishing the rollback failed (%s); retrying", rid, exc)
            return
        self._decided = (rid, float("inf"), why)  # sent; the event ends it here too

    def _hold_off(self, peers: list[Peer]) -> float:
        ids = sorted([self.cluster.node_id, *(p.view.node_id for p in peers)])
        rank = ids.index(self.cluster.node_id)
        return self.settings.hold_off_s + rank * self.settings.rank_step_s
