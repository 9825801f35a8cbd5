"""A gradual rollout of a new node version: its plan, its state, and who gets it. Pure and
synchronous: time is an argument; nothing here reads a clock or talks to the cluster
(:mod:`rapido.cluster.release` spreads the state over Serf and acts on it).

* **Plan** (:func:`parse_plan`): ``{"version": V, "phases": [{"percent": 10,
  "duration_s": 86400}, ...]}``, percents rising within 1..100, each phase lasting its
  ``duration_s``; after the last phase the rollout is ``complete`` and stays at the last
  percent. Any node may start one; every node computes the same percent from the same
  state and its clock (:meth:`RolloutState.percent`): phases are laid out on the wall
  clock from ``started_at``, so nodes whose clocks agree (NTP) switch phases together.
* **Buckets** (:func:`bucket`): user ``u`` is in the new version iff
  ``int(md5(u).hexdigest()[:8], 16) % 100 < percent``. A user's bucket never changes,
  so a user who got the new version keeps it as the percent grows.
* **State** (:class:`RolloutState`): every change is a Serf user event and the state
  carries that event's Lamport time as its ``epoch``: the latest wins everywhere, and a
  node that missed events adopts a peer's state when the peer's epoch is newer.
  ``abort`` (an operator) and ``rollback`` (the health rule) end a running rollout at
  0 %: from then on new sessions avoid its version's nodes (while another version's can
  take them) until the next rollout starts. An end that names another rollout than the
  running one is stale and ignored (so duplicate rollback events change nothing).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Final

import orjson

#: What a version label may be (the same rule as the nodes' tags).
VERSION: Final = re.compile(r"[A-Za-z0-9_.+-]{1,32}")
ROLLOUT_ID: Final = re.compile(r"[0-9a-f]{8,32}")
MAX_PHASES: Final = 10
#: Longest phase: a year (durations are days in production, seconds in tests).
MAX_PHASE_S: Final = 366 * 86400.0
MAX_REASON: Final = 200

NONE: Final = "none"
RUNNING: Final = "running"
COMPLETE: Final = "complete"
ABORTED: Final = "aborted"
ROLLED_BACK: Final = "rolled_back"
STATES: Final = (NONE, RUNNING, COMPLETE, ABORTED, ROLLED_BACK)


class PlanError(ValueError):
    """A rollout body that cannot be taken; ``code`` names the rule, the message the field."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def bucket(user: str) -> int:
    """The user's bucket, 0..99: the first 32 bits of md5(user) modulo 100."""
    if not isinstance(user, str):
        raise TypeError(f"user must be a string, got {type(user).__name__}")
    return int(hashlib.md5(user.encode()).hexdigest()[:8], 16) % 100


@dataclass(frozen=True, slots=True)
class Phase:
    percent: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class RolloutState:
    """What every node holds of the cluster's rollout. ``epoch``: the Lamport time of the
    event that made this state (0: none ever seen)."""

    epoch: int = 0
    id: str = ""
    version: str = ""
    phases: tuple[Phase, ...] = ()
    started_at: float = 0.0  # wall clock (epoch s) at which phase 1 began
    state: str = NONE
    reason: str | None = None
    ended_at: float | None = None  # wall clock of the abort or rollback
    by: str | None = None  # the node that started, aborted or rolled it back

    @property
    def active(self) -> bool:
        """Whether new sessions are split by bucket (running or complete)."""
        return self.state in (RUNNING, COMPLETE)

    def phase_index(self, now: float) -> int:
        """The phase in effect at wall time ``now`` (the last once all are over)."""
        t = self.started_at
        for i, p in enumerate(self.phases):
            t += p.duration_s
            if now < t:
                return i
        return len(self.phases) - 1

    def ends_at(self) -> float:
        return self.started_at + sum(p.duration_s for p in self.phases)

    def percent(self, now: float) -> int:
        """The share of users (by bucket) that get ``version`` at wall time ``now``."""
        if not self.active or not self.phases:
            return 0
        return self.phases[self.phase_index(now)].percent

    def at(self, now: float) -> RolloutState:
        """This state with ``running`` turned ``complete`` once its last phase is over."""
        if self.state == RUNNING and now >= self.ends_at():
            return replace(self, state=COMPLETE)
        return self

    def new_version_for(self, user: str, now: float) -> bool | None:
        """Whether ``user``'s new session goes to ``version`` (True), to another version
        (False: also everyone's after an abort or a rollback, until the next rollout), or
        anywhere (None: no rollout was ever seen)."""
        if self.state == NONE:
            return None
        if not self.active:
            return False
        return bucket(user) < self.percent(now)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The state as the API shows it (and as peers hand it over)."""
        s = self.at(now) if now is not None else self
        out: dict[str, Any] = {
            "epoch": s.epoch, "id": s.id, "version": s.version, "state": s.state,
            "phases": [{"percent": p.percent, "duration_s": p.duration_s} for p in s.phases],
            "started_at": s.started_at, "reason": s.reason, "ended_at": s.ended_at,
            "by": s.by}
        if now is not None:
            out["percent"] = s.percent(now)
            if s.state == RUNNING:
                i = s.phase_index(now)
                out["phase"] = i + 1
                out["next_phase_at"] = (s.started_at
                                        + sum(p.duration_s for p in s.phases[:i + 1]))
        return out


def parse_plan(data: Any, known_versions: set[str]) -> tuple[str, tuple[Phase, ...]]:
    """``POST /api/admin/rollout``'s body: the version (one some member runs) and its
    phases; :class:`PlanError` naming the field otherwise."""
    if not isinstance(data, dict):
        raise PlanError("invalid_rollout", 'the body is {"version": V, "phases": [...]}')
    extra = set(data) - {"version", "phases"}
    if extra:
        raise PlanError("invalid_rollout", f"unknown field(s): {', '.join(sorted(extra))}")
    version = data.get("version")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise PlanError("invalid_version", f"version must match {VERSION.pattern}")
    if version not in known_versions:
        raise PlanError("unknown_version",
                        f"no member of the cluster runs version {version!r} (they run "
                        f"{', '.join(sorted(known_versions)) or 'nothing'})")
    raw = data.get("phases")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PHASES:
        raise PlanError("invalid_phases", f"phases must be a list of 1 to {MAX_PHASES}")
    phases: list[Phase] = []
    for i, p in enumerate(raw):
        where = f"phases[{i}]"
        if not isinstance(p, dict) or set(p) != {"percent", "duration_s"}:
            raise PlanError("invalid_phases", f"{where} must be {{percent, duration_s}}")
        percent, duration = p["percent"], p["duration_s"]
        if isinstance(percent, bool) or not isinstance(percent, int) \
                or not 1 <= percent <= 100:
            raise PlanError("percent_out_of_range",
                            f"{where}.percent must be a whole number within 1..100, "
                            f"got {percent!r}")
        if (isinstance(duration, bool) or not isinstance(duration, int | float)
                or not math.isfinite(duration) or not 0 < duration <= MAX_PHASE_S):
            raise PlanError("invalid_phases", f"{where}.duration_s must be a number "
                            f"within (0, {MAX_PHASE_S:g}], got {duration!r}")
        if phases and percent <= phases[-1].percent:
            raise PlanError("phases_out_of_order",
                            f"{where}.percent ({percent}) must be above the phase before "
                            f"it ({phases[-1].percent}): phases grow")
        phases.append(Phase(percent, float(duration)))
    return version, tuple(phases)


# -- the events that change the state -------------------------------------------------------

#: The Serf user event that carries every change.
EVENT: Final = "rapido-rollout"


def start_event(rollout_id: str, version: str, phases: tuple[Phase, ...],
                started_at: float, by: str) -> bytes:
    return orjson.dumps({"op": "start", "id": rollout_id, "version": version,
                         "phases": [[p.percent, p.duration_s] for p in phases],
                         "at": started_at, "by": by})


def end_event(op: str, rollout_id: str, at: float, by: str, reason: str) -> bytes:
    """An ``abort`` or a ``rollback`` of rollout ``rollout_id``."""
    if op not in ("abort", "rollback"):
        raise ValueError(f"op must be abort or rollback, got {op!r}")
    return orjson.dumps({"op": op, "of": rollout_id, "at": at, "by": by,
                         "reason": reason[:MAX_REASON]})


def apply_event(state: RolloutState, payload: bytes, ltime: int) -> RolloutState | None:
    """The state after the event ``payload`` at Lamport time ``ltime``; ``None`` when it
    changes nothing (older than the state, stale, a duplicate). ValueError when the
    payload is malformed (input from another node)."""
    if ltime <= state.epoch:
        return None
    data = _event(payload)
    op = data["op"]
    if op == "start":
        return RolloutState(epoch=ltime, id=data["id"], version=data["version"],
                            phases=data["phases"], started_at=data["at"], state=RUNNING,
                            by=data["by"])
    if data["of"] != state.id or state.state not in (RUNNING, COMPLETE):
        return None  # ends another rollout, or one already ended: stale or a duplicate
    return replace(state, epoch=ltime, state=ABORTED if op == "abort" else ROLLED_BACK,
                   reason=data["reason"], ended_at=data["at"], by=data["by"])


def _event(payload: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("op") not in ("start", "abort", "rollback"):
        raise ValueError("op must be start, abort or rollback")
    at, by = data.get("at"), data.get("by")
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise ValueError("at must be a time")
    if not isinstance(by, str) or len(by) > 64:
        raise ValueError("by must be a node id")
    data["at"] = float(at)
    if data["op"] == "start":
        rid, version, raw = data.get("id"), data.get("version"), data.get("phases")
        if not isinstance(rid, str) or not ROLLOUT_ID.fullmatch(rid):
            raise ValueError("id must be hex")
        if not isinstance(version, str) or not VERSION.fullmatch(version):
            raise ValueError("bad version")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PHASES:
            raise ValueError("bad phases")
        phases = []
        for p in raw:
            if (not isinstance(p, list) or len(p) != 2 or isinstance(p[0], bool)
                    or not isinstance(p[0], int) or not 1 <= p[0] <= 100
                    or not isinstance(p[1], int | float) or not 0 < p[1] <= MAX_PHASE_S):
                raise ValueError("bad phase")
            phases.append(Phase(p[0], float(p[1])))
        data["phases"] = tuple(phases)
    else:
        rid, reason = data.get("of"), data.get("reason")
        if not isinstance(rid, str) or not ROLLOUT_ID.fullmatch(rid):
            raise ValueError("of must be a rollout id")
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise ValueError("reason must be a short string")
    return data


def state_from_json(data: Any) -> RolloutState:
    """A peer's state as :meth:`RolloutState.to_json` wrote it (without ``now``);
    ValueError when malformed."""
    if not isinstance(data, dict):
        raise ValueError("a rollout state is an object")
    try:
        epoch, state = data["epoch"], data["state"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError("epoch must be a whole number")
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        if state == NONE:
            return RolloutState(epoch=epoch)
        start = _event(orjson.dumps({
            "op": "start", "id": data["id"], "version": data["version"],
            "phases": [[p["percent"], p["duration_s"]] for p in data["phases"]],
            "at": data["started_at"], "by": data["by"] or ""}))
        ended_at, reason = data.get("ended_at"), data.get("reason")
        if ended_at is not None and (isinstance(ended_at, bool)
                                     or not isinstance(ended_at, int | float)):
            raise ValueError("ended_at must be a time")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
            raise ValueError("reason must be a short string")
        return RolloutState(epoch=epoch, id=start["id"], version=start["version"],
                            phases=start["phases"], started_at=start["at"],
                            state=RUNNING if state == COMPLETE else state, reason=reason,
                            ended_at=None if ended_at is None else float(ended_at),
                            by=start["by"] or None)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a rollout state lacks or garbles {exc}") from None
