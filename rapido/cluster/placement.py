"""Placement: which node serves a lesson. Pure and synchronous: the caller passes the
members it sees (:class:`MemberView`, built from the Serf agent's member list and tags)
and the time; nothing here reads a clock, opens a socket or keeps module state.

The rules, in the order :func:`place` applies them:

1. **Eligible** members are ``alive``, not draining, and have a free slot
   (:attr:`MemberView.eligible`); nothing else is ever chosen.
2. **Region** (:func:`choose_region`): a region-code ``user_location`` names the region;
   ``{lat, lon}`` takes the region of the eligible member whose ``location`` is nearest
   (haversine; ties: smaller region, then smaller node id); no location (or no eligible
   member with a location and a region) takes the deciding node's own region. The pool is
   that region's eligible members, or every eligible member when it has none.
3. **Rendezvous** (weighted HRW, :func:`hrw_score`): score = ``-capacity / ln(u)``, ``u``
   in (0, 1) from BLAKE2b of (lesson, node id), never Python's salted ``hash()``; highest
   score first, ties by smaller node id. Every node with the same view computes the same
   order, and a member joining or leaving moves only the lessons that map to or from it.
4. **Bounded loads** (Mirrokni, Thorup, Zadimoghaddam 2017; HAProxy's hash-balance-factor):
   a member whose ``load`` is above ``(1 + epsilon)`` x the pool's capacity-weighted mean
   load passes the lesson on to the next member in rendezvous order. Such members stay at
   the end of the ranked list (they still have a free slot), so a caller failing over
   tries every eligible member of the pool.
5. **Affinity** (:class:`Affinity`): a node remembers the lessons it served for an hour
   after they end; ``place(..., sticky=holder)`` puts that holder first when it is still
   eligible (any region, regardless of load). :func:`should_query` says when the
   rendezvous owner must ask the cluster who holds a lesson it has no record of.

Also here: session ids that carry their node (:func:`make_session_id`,
:func:`session_node`) and the rule that picks one of two sessions of a lesson after a
healed partition (:func:`resolve_double`).

One module, a little over 500 lines, on purpose: every rule above reads the same member
view and the same rendezvous hash, and nodes must agree on all of them at once; split
apart, a change to one (the hash, eligibility) could drift from the others.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rapido.pipeline.geo import LatLon, haversine_km, lat_lon, parse_location

__all__ = [
    "AFFINITY_TTL_S",
    "DEFAULT_EPSILON",
    "MOVED",
    "NODE_ID",
    "Affinity",
    "Claim",
    "MemberView",
    "Placement",
    "Resolution",
    "check_book",
    "choose_region",
    "haversine_km",
    "home_moved",
    "home_order",
    "hrw_score",
    "make_session_id",
    "mean_load",
    "parse_user_location",
    "place",
    "rank",
    "rendezvous_order",
    "resolve_double",
    "session_node",
    "should_query",
]

#: Node ids and region codes: what a Serf node name and a region tag may be.
NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RANDOM = re.compile(r"[0-9a-f]{16,64}")
#: ``{node_id}.{random hex}``: the random part has no dot, so the last dot separates.
_SESSION_ID = re.compile(r"([A-Za-z0-9_.-]{1,64})\.([0-9a-f]{16,64})")
_SESSION_ID_MAX = 64 + 1 + 64

DEFAULT_EPSILON = 0.25
AFFINITY_TTL_S = 3600.0
#: The reason the loser of :func:`resolve_double` closes its session with.
MOVED = "moved"

UserLocation = str | LatLon | None


def parse_user_location(value: Any, *, where: str = "user_location") -> UserLocation:
    """``None``, a region code, ``{"lat", "lon"}`` (as the API's session spec carries it)
    or ``(lat, lon)``; ValueError naming ``where`` for anything else."""
    return parse_location(value, where=where)


def _count(value: Any, name: str, node_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"member {node_id!r}: {name} must be an integer >= 0, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member as a node sees it: Serf's name and status, and the node's tags.

    ``capacity`` and ``free_slots`` count streams; ``load`` is the node's load as a
    fraction of what it can carry (0 idle, 1 at its limit, may exceed 1: the engine's
    ``NodeLoad``); ``location`` is (lat, lon) in degrees. Construction validates every
    field and raises ValueError naming the member: a caller building views from gossip
    tags drops the member it cannot read, not the whole view."""

    node_id: str
    region: str | None
    location: LatLon | None
    capacity: int
    free_slots: int
    load: float = 0.0
    draining: bool = False
    status: str = "alive"
    version: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not NODE_ID.fullmatch(self.node_id):
            raise ValueError(f"member node_id must match [A-Za-z0-9_.-]{{1,64}}, "
                             f"got {self.node_id!r}")
        nid = self.node_id
        if self.region is not None and (not isinstance(self.region, str)
                                        or not NODE_ID.fullmatch(self.region)):
            raise ValueError(f"member {nid!r}: region must be None or match "
                             f"[A-Za-z0-9_.-]{{1,64}}, got {self.region!r}")
        if self.location is not None:
            if not isinstance(self.location, tuple | list) or len(self.location) != 2:
                raise ValueError(f"member {nid!r}: location must be (lat, lon), "
                                 f"got {self.location!r}")
            object.__setattr__(self, "location",
                               lat_lon(*self.location, f"member {nid!r} location"))
        _count(self.capacity, "capacity", nid)
        _count(self.free_slots, "free_slots", nid)
        if self.free_slots > self.capacity:
            raise ValueError(f"member {nid!r}: free_slots ({self.free_slots}) exceeds "
                             f"capacity ({self.capacity})")
        load = self.load
        if (isinstance(load, bool) or not isinstance(load, int | float)
                or not math.isfinite(load) or load < 0):
            raise ValueError(f"member {nid!r}: load must be a finite number >= 0, got {load!r}")
        object.__setattr__(self, "load", float(load))
        if not isinstance(self.draining, bool):
            raise ValueError(f"member {nid!r}: draining must be a bool, got {self.draining!r}")
        if not isinstance(self.status, str) or not isinstance(self.version, str):
            raise ValueError(f"member {nid!r}: status and version must be strings")

    @property
    def eligible(self) -> bool:
        """Alive, not draining, with a free slot (zero capacity is never eligible)."""
        return self.status == "alive" and not self.draining and self.free_slots > 0


def _check_lesson(lesson: Any) -> str:
    if not isinstance(lesson, str) or not lesson:
        raise ValueError(f"lesson must be a non-empty string, got {lesson!r}")
    return lesson


def _check_view(members: Iterable[MemberView]) -> list[MemberView]:
    view = list(members)
    seen: set[str] = set()
    for m in view:
        if not isinstance(m, MemberView):
            raise TypeError(f"members must be MemberView, got {type(m).__name__}")
        if m.node_id in seen:
            raise ValueError(f"duplicate member {m.node_id!r} in the view")
        seen.add(m.node_id)
    return view


def _check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0 (math.inf: no bound), got {epsilon!r}")
    return float(epsilon)


# -- rendezvous hashing ---------------------------------------------------------------------


def _unit(lesson: str, node_id: str) -> float:
    """u in (0, 1), the same in every process and on every host: BLAKE2b of the lesson
    (length-prefixed, so no pair of strings collides by concatenation) and the node id."""
    lb = lesson.encode("utf-8", "surrogatepass")
    nb = node_id.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(len(lb).to_bytes(4, "big") + lb + nb, digest_size=8,
                             person=b"rapido-hrw").digest()
    # 52 bits + 0.5, over 2**52: exact in a double, never 0 and never 1 (ln(u) < 0).
    return ((int.from_bytes(digest, "big") >> 12) + 0.5) / 4503599627370496.0


def hrw_score(lesson: str, node_id: str, weight: float) -> float:
    """The weighted rendezvous score ``-weight / ln(u)``: a node's share of lessons is
    ``weight / sum(weights)`` (the max of exponentials with rates 1/weight)."""
    _check_lesson(lesson)
    if (isinstance(weight, bool) or not isinstance(weight, int | float)
            or not math.isfinite(weight) or weight <= 0):
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    return -weight / math.log(_unit(lesson, node_id))


def rendezvous_order(lesson: str, members: Iterable[MemberView]) -> list[MemberView]:
    """The members by weighted rendezvous score for ``lesson`` (weight = capacity), best
    first; ties by smaller node id. Members with zero capacity come last, by node id.
    Eligibility is not looked at: that is :func:`rank`'s job."""
    _check_lesson(lesson)
    view = _check_view(members)

    def key(m: MemberView) -> tuple[float, str]:
        score = hrw_score(lesson, m.node_id, m.capacity) if m.capacity > 0 else 0.0
        return (-score, m.node_id)

    return sorted(view, key=key)


def mean_load(members: Sequence[MemberView]) -> float:
    """The capacity-weighted mean load (total load over total capacity); 0 for none."""
    total = sum(m.capacity for m in members)
    return sum(m.load * m.capacity for m in members) / total if total else 0.0


def rank(lesson: str, members: Iterable[MemberView], *,
         epsilon: float = DEFAULT_EPSILON) -> list[MemberView]:
    """The eligible members for ``lesson``, best first: in rendezvous order those at or
    below ``(1 + epsilon)`` x :func:`mean_load` of the eligible members, then, in
    rendezvous order, those above it. ``epsilon = math.inf`` is plain rendezvous."""
    epsilon = _check_epsilon(epsilon)
    pool = [m for m in _check_view(members) if m.eligible]
    return _bounded(rendezvous_order(lesson, pool), epsilon)


def _bounded(order: list[MemberView], epsilon: float) -> list[MemberView]:
    if math.isinf(epsilon):
        return order
    bound = (1.0 + epsilon) * mean_load(order)
    within = [m for m in order if m.load <= bound]
    over = [m for m in order if m.load > bound]
    return within + over


# -- region ---------------------------------------------------------------------------------


def choose_region(members: Iterable[MemberView], user_location: Any,
                  self_region: str | None) -> str | None:
    """The region a lesson's user belongs to (see rule 2 in the module docstring). The
    region returned may have no eligible member: :func:`place` then uses every eligible
    member. ``user_location`` goes through :func:`parse_user_location` (ValueError)."""
    where = parse_user_location(user_location)
    if isinstance(where, str):
        return where
    if where is not None:
        located = [m for m in _check_view(members)
                   if m.eligible and m.location is not None and m.region is not None]
        if located:
            point = where

            def key(m: MemberView) -> tuple[float, str, str]:
                assert m.location is not None and m.region is not None
                return (haversine_km(point, m.location), m.region, m.node_id)

            nearest = min(located, key=key)
            return nearest.region
    return self_region


# -- placement ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a lesson goes. ``owner`` is ``ranked[0]``; ``ranked`` holds every candidate
    of the pool, best first, for failing over. ``region`` is the region the pool came
    from, ``None`` when the pool is every eligible member (no region, or the chosen
    region had none eligible). ``reason``: ``affinity`` (the sticky holder),
    ``rendezvous`` (the top rendezvous choice), ``bounded`` (the top choice was above the
    load bound and passed it on)."""

    lesson: str
    owner: MemberView
    ranked: tuple[MemberView, ...]
    region: str | None
    reason: str


def place(lesson: str, members: Iterable[MemberView], *, user_location: Any = None,
          self_region: str | None = None, epsilon: float = DEFAULT_EPSILON,
          sticky: str | None = None) -> Placement | None:
    """Where ``lesson`` goes in this view, or ``None`` when no member is eligible (empty
    view, everyone full, draining or failed: the caller answers 503). ``sticky`` is the
    node id that holds the lesson's affinity record, if one is known; it goes first when
    it is still eligible. Raises ValueError for a bad lesson, location, epsilon or a view
    with the same node twice."""
    _check_lesson(lesson)
    epsilon = _check_epsilon(epsilon)
    view = _check_view(members)
    everyone = [m for m in view if m.eligible]
    region = choose_region(everyone, user_location, self_region)
    if not everyone:
        return None
    pool = [m for m in everyone if region is not None and m.region == region]
    if not pool:
        pool, region = everyone, None
    order = rendezvous_order(lesson, pool)
    ranked = _bounded(order, epsilon)
    reason = "rendezvous" if ranked[0] is order[0] else "bounded"
    holder = next((m for m in everyone if m.node_id == sticky), None)
    if holder is not None:
        ranked = [holder, *(m for m in ranked if m is not holder)]
        reason = "affinity"
    return Placement(lesson, ranked[0], tuple(ranked), region, reason)


def home_order(lesson: str, members: Iterable[MemberView],
               region: str | None) -> list[MemberView]:
    """The lesson's homes, best first: the members that keep its record and decide where
    it plays. Rendezvous order over the alive, non-draining members of ``region`` (every
    such member when the region has none), free slots and load left out: a full node
    still answers for its lessons, and every node computes the same home from views that
    differ in figures that change by the second. The caller asks the first that answers.
    """
    _check_lesson(lesson)
    alive = [m for m in _check_view(members)
             if m.status == "alive" and not m.draining and m.capacity > 0]
    pool = [m for m in alive if region is not None and m.region == region] or alive
    return rendezvous_order(lesson, pool)


def home_moved(lesson: str, views: Iterable[Iterable[MemberView]], region: str | None,
               node_id: str) -> bool:
    """Whether, in any of ``views`` (those in effect over the last hour), the lesson's
    home was not ``node_id``: then another node may have placed it, and ``node_id``'s
    records of it are not the whole truth. A view with no home counts as moved."""
    for view in views:
        homes = home_order(lesson, view, region)
        if not homes or homes[0].node_id != node_id:
            return True
    return False


def should_query(lesson: str, view_changed_at: float | None, now: float, has_record: bool,
                 *, window_s: float = AFFINITY_TTL_S) -> bool:
    """Whether the rendezvous owner of ``lesson`` must ask the cluster (a Serf query) who
    holds it: only when it has no record of the lesson and the membership changed less
    than ``window_s`` ago (``view_changed_at`` after ``now`` counts as recent; ``None``:
    never changed). With no change for ``window_s``, the owner now was the owner all
    along, so its own records are the whole truth. ``lesson`` does not enter the answer;
    it is checked, and named, like everywhere else."""
    _check_lesson(lesson)
    if not math.isfinite(now) or not (window_s > 0):
        raise ValueError(f"now must be finite and window_s > 0, got {now!r}, {window_s!r}")
    if has_record or view_changed_at is None:
        return False
    if math.isnan(view_changed_at):
        raise ValueError("view_changed_at must not be NaN")
    return now - view_changed_at < window_s


# -- affinity -------------------------------------------------------------------------------


def check_book(ttl_s: float, max_records: int) -> tuple[float, int]:
    """A record book's limits (:class:`Affinity`, the home's ``Directory``), checked:
    ValueError for a ttl that is not a finite number > 0 or a count that is not >= 1."""
    if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a finite number > 0, got {ttl_s!r}")
    if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
        raise ValueError(f"max_records must be an integer >= 1, got {max_records!r}")
    return float(ttl_s), max_records


class Affinity:
    """The lessons this node served, held while they play and ``ttl_s`` after they end,
    so a returning lesson comes back here. Pure: ``now`` is a monotonic clock's seconds,
    passed in; it must not go backwards (ValueError).

    At most ``max_records`` records: past that, the record that ended first goes (it is
    the nearest to expiry); with no ended record, the live record remembered longest ago.
    """

    def __init__(self, ttl_s: float = AFFINITY_TTL_S, max_records: int = 10_000) -> None:
        self.ttl_s, self.max_records = check_book(ttl_s, max_records)
        self.evicted = 0
        self._live: OrderedDict[str, float] = OrderedDict()  # lesson -> remembered at
        self._ended: OrderedDict[str, float] = OrderedDict()  # lesson -> ended at, in order
        self._now = -math.inf

    def _tick(self, now: float) -> None:
        if not isinstance(now, int | float) or math.isnan(now):
            raise ValueError(f"now must be a number, got {now!r}")
        if now < self._now:
            raise ValueError(f"time went backwards: {now} < {self._now}")
        self._now = now

    def __len__(self) -> int:
        return len(self._live) + len(self._ended)

    def remember(self, lesson: str, now: float) -> None:
        """The lesson plays here from ``now``: held until it ends (and ``ttl_s`` after)."""
        _check_lesson(lesson)
        self._tick(now)
        self._ended.pop(lesson, None)
        self._live.pop(lesson, None)
        self._live[lesson] = now
        self._trim()

    def ended(self, lesson: str, now: float) -> None:
        """The lesson's stream ended at ``now``: held until ``now + ttl_s``. A lesson this
        book never saw is recorded too (it played here)."""
        _check_lesson(lesson)
        self._tick(now)
        self._live.pop(lesson, None)
        self._ended.pop(lesson, None)
        self._ended[lesson] = now
        self._trim()

    def holds(self, lesson: str, now: float) -> bool:
        """Whether the lesson plays here or ended less than ``ttl_s`` before ``now``."""
        if lesson in self._live:
            return True
        ended_at = self._ended.get(lesson)
        return ended_at is not None and now - ended_at < self.ttl_s

    def expire(self, now: float) -> list[str]:
        """Forget what ended ``ttl_s`` or more before ``now``; the lessons forgotten, in
        the order they ended."""
        self._tick(now)
        gone: list[str] = []
        while self._ended:
            lesson, ended_at = next(iter(self._ended.items()))
            if now - ended_at < self.ttl_s:
                break
            del self._ended[lesson]
            gone.append(lesson)
        return gone

    def _trim(self) -> None:
        while len(self) > self.max_records:
            (self._ended if self._ended else self._live).popitem(last=False)
            self.evicted += 1


# -- session ids ----------------------------------------------------------------------------


def make_session_id(node_id: str, random_hex: str) -> str:
    """``{node_id}.{random_hex}``: URL-safe (RFC 3986 unreserved characters only) and
    read back by :func:`session_node`. ``random_hex`` is 16-64 lowercase hex digits
    (``secrets.token_hex(16)``); ValueError otherwise or for a bad node id."""
    if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
        raise ValueError(f"node_id must match [A-Za-z0-9_.-]{{1,64}}, got {node_id!r}")
    if not isinstance(random_hex, str) or not _RANDOM.fullmatch(random_hex):
        raise ValueError("random_hex must be 16-64 lowercase hex digits")
    return f"{node_id}.{random_hex}"


def session_node(session_id: object) -> str | None:
    """The node a session id was made on, or ``None`` for anything that is not one (any
    type, any length, an older plain-hex id); never raises: it reads URLs."""
    if not isinstance(session_id, str) or len(session_id) > _SESSION_ID_MAX:
        return None
    match = _SESSION_ID.fullmatch(session_id)
    return match.group(1) if match else None


# -- two sessions of one lesson -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """One node's session of a lesson: ``created_at`` is the wall-clock time (epoch
    seconds) the claiming node stamped on it."""

    node_id: str
    session_id: str
    created_at: float

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not NODE_ID.fullmatch(self.node_id):
            raise ValueError(f"claim node_id must match [A-Za-z0-9_.-]{{1,64}}, "
                             f"got {self.node_id!r}")
        if not isinstance(self.session_id, str) or not self.session_id:
            raise ValueError(f"claim session_id must be a non-empty string, "
                             f"got {self.session_id!r}")
        if (isinstance(self.created_at, bool) or not isinstance(self.created_at, int | float)
                or not math.isfinite(self.created_at)):
            raise ValueError(f"claim created_at must be a finite number, "
                             f"got {self.created_at!r}")


@dataclass(frozen=True, slots=True)
class Resolution:
    """Which session of a lesson stays. The loser's node closes its session with
    ``reason`` (``moved``). ``rule``: ``owner``, ``earlier``, ``node_id`` or
    ``session_id``, whichever decided."""

    winner: Claim
    loser: Claim
    rule: str
    reason: str = MOVED


def resolve_double(lesson: str, a: Claim, b: Claim,
                   members: Iterable[MemberView]) -> Resolution:
    """Two sessions of ``lesson`` (a healed partition): the same winner on every node
    with the same view, whatever the order of ``a`` and ``b``.

    1. the rendezvous owner of the lesson among the members that are alive and not
       draining (weight = capacity; free slots, load and region are left out, as they
       change by the second and differ between views), if exactly one claim is on it;
    2. else the claim created earlier;
    3. else the smaller node id; 4. else the smaller session id.

    ValueError when both claims are the same session."""
    _check_lesson(lesson)
    if a.session_id == b.session_id:
        raise ValueError(f"both claims are session {a.session_id!r}: not a double session")
    candidates = [m for m in _check_view(members)
                  if m.status == "alive" and not m.draining and m.capacity > 0]
    order = rendezvous_order(lesson, candidates)
    if order and (a.node_id == order[0].node_id) != (b.node_id == order[0].node_id):
        winner = a if a.node_id == order[0].node_id else b
        return Resolution(winner, b if winner is a else a, "owner")
    if a.created_at != b.created_at:
        return Resolution(a, b, "earlier") if a.created_at < b.created_at \
            else Resolution(b, a, "earlier")
    if a.node_id != b.node_id:
        return Resolution(a, b, "node_id") if a.node_id < b.node_id \
            else Resolution(b, a, "node_id")
    return Resolution(a, b, "session_id") if a.session_id < b.session_id \
        else Resolution(b, a, "session_id")
