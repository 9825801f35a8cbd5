"""A lesson's home keeps where the lesson plays.

Every lesson has a home (:func:`rapido.cluster.placement.home_order`): the node every
other node asks when a session for it is to be created. The home decides where the
lesson plays (itself or, past the load bound or when full, the next choice) and keeps a
record of it here, so the next request for the lesson, through any node, finds the same
session, wherever it plays, without asking the cluster.

Records come from the home's own placements and from *claims*: every node tells each
lesson's home, whenever its view of the members changes (a node joined, came back after
a partition, left) and every few minutes, which sessions it plays. So a home that is new
to a lesson after a change learns of it without a query, and two sessions of one lesson
(a healed partition) meet at the one home, which resolves them
(:func:`rapido.cluster.placement.resolve_double`).

A record is kept ``ttl_s`` (an hour) after it was last placed or claimed: a live session
is claimed again well within that, a lesson that ended keeps its record for the hour its
node's affinity holds it. Pure: ``now`` (monotonic seconds) is an argument.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from rapido.cluster.placement import AFFINITY_TTL_S, Claim, check_book

__all__ = ["Directory", "Record"]


@dataclass(frozen=True, slots=True)
class Record:
    """The lesson's session as its home last heard of it."""

    claim: Claim
    seen_at: float  # monotonic seconds of the last placement or claim


class Directory:
    """``lesson -> Record``, oldest first, at most ``max_records`` (the least recently
    seen goes first)."""

    def __init__(self, ttl_s: float = AFFINITY_TTL_S, max_records: int = 100_000) -> None:
        self.ttl_s, self.max_records = check_book(ttl_s, max_records)
        self.evicted = 0
        self._records: OrderedDict[str, Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def lookup(self, lesson: str, now: float) -> Record | None:
        """The lesson's record, unless it is older than ``ttl_s``."""
        rec = self._records.get(lesson)
        if rec is None:
            return None
        if now - rec.seen_at >= self.ttl_s:
            del self._records[lesson]
            return None
        return rec

    def record(self, lesson: str, claim: Claim, now: float) -> Record | None:
        """``claim`` is the lesson's session from ``now``. Returns the record it replaces
        when that was a *different* session still within its ``ttl_s`` (the caller
        decides whether both play: a double), else ``None``."""
        if not isinstance(lesson, str) or not lesson:
            raise ValueError(f"lesson must be a non-empty string, got {lesson!r}")
        if not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"now must be a finite number, got {now!r}")
        old = self.lookup(lesson, now)
        self._records.pop(lesson, None)
        self._records[lesson] = Record(claim, now)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)
            self.evicted += 1
        if old is not None and old.claim.session_id != claim.session_id:
            return old
        return None

    def forget(self, lesson: str, session_id: str) -> bool:
        """Drop the lesson's record if it names ``session_id`` (a session known gone)."""
        rec = self._records.get(lesson)
        if rec is None or rec.claim.session_id != session_id:
            return False
        del self._records[lesson]
        return True

    def expire(self, now: float) -> int:
        """Forget records older than ``ttl_s``; how many went."""
        gone = 0
        while self._records:
            lesson, rec = next(iter(self._records.items()))
            if now - rec.seen_at < self.ttl_s:
                break
            del self._records[lesson]
            gone += 1
        return gone
