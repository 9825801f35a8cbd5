"""A node's health over the last five minutes, the rule that rolls a rollout back, and
the cluster's scale signals. Pure and synchronous: time is an argument.

**Health** (:class:`HealthWindow`): sessions ended (and of those, ended by an error), the
underruns of the sessions that ended, GPU memory errors, and the node's frame latency
(how late frames left for their sinks), each over a sliding window of ``window_s``
(300 s) kept as ``slot_s`` (10 s) slots. Frame latency and GPU memory errors are read as
snapshots of the node's cumulative Prometheus series (nothing is added to the per-frame
path); ended sessions are told one by one. :class:`Health` is what a node gossips of it,
in one short tag (:func:`encode`, :func:`decode`).

**Rollback** (:func:`rollback_reason`), over the new version's nodes (figures summed):
error rate > 1 % (sessions ended by an error / sessions ended), p95 frame latency >
1.5 x the old version's, > 10 underruns per ended session, or any GPU memory error. A
version's p95 is the frame-weighted mean of its nodes' p95s (a node counts once it has
:data:`MIN_FRAMES` frames in the window), and a p95 under :data:`LATENCY_FLOOR_MS` (half
a frame at 25 fps, invisible to a viewer) is taken as that floor: a new version at 3 ms
beside an old one at 1 ms is not "1.5 x worse".

**Scale signals** (:func:`scale_signals`): what the alive members carry, summed, and
``recommended_nodes = ceil(max(streams / (0.8 x capacity per node), sum cpu / 0.7,
sum GPU memory / 0.8))``, each sum in nodes' worth (a node's CPU and GPU memory are
fractions of its own), at least 1.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

ERROR_RATE: Final = 0.01
LATENCY_RATIO: Final = 1.5
LATENCY_FLOOR_MS: Final = 20.0
UNDERRUNS_PER_SESSION: Final = 10.0
#: Frames a node must have rendered in the window before its p95 counts (10 s of a stream).
MIN_FRAMES: Final = 250
WINDOW_S: Final = 300.0
SLOT_S: Final = 10.0
#: Errors: the close reasons that mean the session failed (a fault in its tick, its sink).
ERROR_REASONS: Final = frozenset({"error", "sink_error", "livekit_degraded"})

# Scale signals: the headroom each resource is planned to.
STREAM_TARGET: Final = 0.8
CPU_TARGET: Final = 0.7
GPU_MEMORY_TARGET: Final = 0.8


@dataclass(frozen=True, slots=True)
class Health:
    """A node's figures over the window."""

    ended: int = 0
    errors: int = 0
    underruns: int = 0  # of the sessions that ended in the window
    gpu_memory_errors: int = 0
    p95_ms: float | None = None  # None: fewer than MIN_FRAMES frames in the window
    frames: int = 0

    def __post_init__(self) -> None:
        for name in ("ended", "errors", "underruns", "gpu_memory_errors", "frames"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
        if self.errors > self.ended:
            raise ValueError(f"errors ({self.errors}) cannot exceed ended ({self.ended})")
        if self.p95_ms is not None and not (math.isfinite(self.p95_ms)
                                            and 0 <= self.p95_ms <= 1e6):
            raise ValueError(f"p95_ms must be within 0..1e6, got {self.p95_ms!r}")


#: A node with nothing to report (or of a version that reports nothing).
NO_HEALTH: Final = Health()


def two_figures(x: float) -> int:
    """``x`` rounded to two significant figures (7549 -> 7500, 133.4 -> 130, 3.4 -> 3):
    a sliding window's frame count and p95 move a little every second, and a tag that
    changes costs a gossip round on every node."""
    if x < 100:
        return round(x)
    scale = 10 ** (len(str(int(x))) - 2)
    return round(x / scale) * scale


def encode(h: Health) -> str:
    """``ended,errors,underruns,gpu_errors,p95_ms,frames`` (p95 empty when unknown; p95
    and frames to two significant figures)."""
    p95 = "" if h.p95_ms is None else str(two_figures(h.p95_ms))
    return (f"{h.ended},{h.errors},{h.underruns},{h.gpu_memory_errors},{p95},"
            f"{two_figures(h.frames)}")


def decode(text: str) -> Health:
    """The tag another node wrote; ValueError when malformed."""
    parts = text.split(",") if isinstance(text, str) and len(text) <= 80 else []
    if len(parts) != 6:
        raise ValueError(f"health must be 6 comma-separated figures, got {text!r}")

    def count(s: str) -> int:
        if not s.isascii() or not s.isdigit() or len(s) > 10:
            raise ValueError(f"health figure {s!r} is not a whole number")
        return int(s)

    ended, errors, underruns, gpu, p95, frames = parts
    return Health(count(ended), count(errors), count(underruns), count(gpu),
                  None if p95 == "" else float(count(p95)), count(frames))


class HealthWindow:
    """This node's figures over the last ``window_s``, in ``slot_s`` slots.

    ``sample(now, latency_buckets, gpu_errors_total)`` takes the cumulative counts of the
    frame-latency histogram (one per bucket bound of ``bounds_s``, Prometheus' ``le``
    order, the last being +Inf) and the cumulative GPU memory error count: call it about
    once a second; the window's figures are the difference between now and the oldest
    snapshot in it. ``session_ended`` counts one ended session."""

    def __init__(self, bounds_s: Sequence[float], *, window_s: float = WINDOW_S,
                 slot_s: float = SLOT_S) -> None:
        if not bounds_s or list(bounds_s) != sorted(bounds_s) or bounds_s[-1] != math.inf:
            raise ValueError("bounds_s must rise and end at +inf")
        if not 0 < slot_s <= window_s:
            raise ValueError("need 0 < slot_s <= window_s")
        self.bounds_s = tuple(bounds_s)
        self.window_s = window_s
        self.slot_s = slot_s
        # (slot start, ended, errors, underruns) per slot with sessions that ended
        self._ended: collections.deque[list[float]] = collections.deque()
        # (time, cumulative latency counts, cumulative gpu errors), one per slot
        self._snaps: collections.deque[tuple[float, tuple[int, ...], int]] = \
            collections.deque()
        self._last: tuple[float, tuple[int, ...], int] | None = None
        # Drills (made-up figures an operator adds to rehearse a rollback), apart from the
        # real ones so that they can be cleared: (time, figures, latency bucket counts).
        self._drills: collections.deque[tuple[float, Health, tuple[int, ...]]] = \
            collections.deque()

    def drill(self, now: float, figures: Health, latency_s: float | None = None) -> None:
        """Add made-up figures to the window: ``figures``' ended, errors, underruns and
        GPU memory errors, and ``figures.frames`` frames ``latency_s`` late."""
        counts = [0] * len(self.bounds_s)
        if figures.frames:
            if latency_s is None or not (math.isfinite(latency_s) and latency_s >= 0):
                raise ValueError("drilled frames need a latency_s >= 0")
            first = bisect.bisect_left(self.bounds_s, latency_s)
            for i in range(first, len(counts)):
                counts[i] = figures.frames
        self._drills.append((now, figures, tuple(counts)))

    def clear_drills(self) -> None:
        self._drills.clear()

    def session_ended(self, now: float, error: bool, underruns: int) -> None:
        start = now - now % self.slot_s
        if not self._ended or self._ended[-1][0] != start:
            self._ended.append([start, 0, 0, 0])
        slot = self._ended[-1]
        slot[1] += 1
        slot[2] += int(error)
        slot[3] += max(0, int(underruns))
        self._trim(now)

    def sample(self, now: float, latency_buckets: Sequence[int], gpu_errors_total: int) -> None:
        if len(latency_buckets) != len(self.bounds_s):
            raise ValueError(f"expected {len(self.bounds_s)} bucket counts, "
                             f"got {len(latency_buckets)}")
        snap = (now, tuple(int(c) for c in latency_buckets), int(gpu_errors_total))
        if not self._snaps or now - self._snaps[-1][0] >= self.slot_s:
            self._snaps.append(snap)
        self._last = snap
        self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._ended and self._ended[0][0] + self.slot_s <= horizon:
            self._ended.popleft()
        # Keep the newest snapshot at or before the horizon: the window's baseline.
        while len(self._snaps) > 1 and self._snaps[1][0] <= horizon:
            self._snaps.popleft()
        while self._drills and self._drills[0][0] <= horizon:
            self._drills.popleft()

    def figures(self, now: float) -> Health:
        self._trim(now)
        ended = sum(int(s[1]) for s in self._ended)
        errors = sum(int(s[2]) for s in self._ended)
        underruns = sum(int(s[3]) for s in self._ended)
        gpu = 0
        counts = [0] * len(self.bounds_s)
        if self._last is not None and self._snaps:
            base = self._snaps[0]
            gpu = max(0, self._last[2] - base[2])
            counts = [max(0, a - b) for a, b in zip(self._last[1], base[1], strict=True)]
        for _, h, drilled in self._drills:
            ended += h.ended
            errors += h.errors
            underruns += h.underruns
            gpu += h.gpu_memory_errors
            counts = [a + b for a, b in zip(counts, drilled, strict=True)]
        frames = counts[-1]
        p95: float | None = None
        if frames >= MIN_FRAMES:
            p95 = 1000.0 * quantile(self.bounds_s, counts, 0.95)
        return Health(ended=ended, errors=errors, underruns=underruns,
                      gpu_memory_errors=gpu, p95_ms=p95, frames=frames)


def quantile(bounds_s: Sequence[float], cumulative: Sequence[int], q: float) -> float:
    """The ``q`` quantile of a histogram given as cumulative counts per upper bound,
    interpolated linearly within its bucket (as Prometheus' ``histogram_quantile``)."""
    total = cumulative[-1]
    if total <= 0:
        return 0.0
    rank = q * total
    i = bisect.bisect_left(cumulative, rank)
    i = min(i, len(bounds_s) - 1)
    upper = bounds_s[i]
    lower = bounds_s[i - 1] if i > 0 else 0.0
    if math.isinf(upper):
        return lower  # past the last finite bound: the bound is all we know
    below = cumulative[i - 1] if i > 0 else 0
    inside = cumulative[i] - below
    frac = (rank - below) / inside if inside > 0 else 1.0
    return lower + (upper - lower) * frac


# -- the rollback rule ------------------------------------------------------------------------


def _p95(figures: Iterable[Health]) -> float | None:
    known = [(h.p95_ms, h.frames) for h in figures if h.p95_ms is not None and h.frames]
    frames = sum(f for _, f in known)
    if not frames:
        return None
    return sum(p * f for p, f in known if p is not None) / frames


def rollback_reason(new: Sequence[Health], old: Sequence[Health]) -> str | None:
    """Why the new version must be rolled back, from its nodes' figures (``new``) and
    the old version's (``old``); ``None`` while it is healthy."""
    gpu = sum(h.gpu_memory_errors for h in new)
    if gpu:
        return f"{gpu} GPU memory error(s) on the new version's nodes"
    ended = sum(h.ended for h in new)
    errors = sum(h.errors for h in new)
    if ended and errors / ended > ERROR_RATE:
        return (f"error rate {errors / ended:.1%} ({errors} of {ended} sessions ended by "
                f"an error) > {ERROR_RATE:.0%}")
    underruns = sum(h.underruns for h in new)
    if ended and underruns / ended > UNDERRUNS_PER_SESSION:
        return (f"{underruns / ended:.1f} underruns per ended session > "
                f"{UNDERRUNS_PER_SESSION:g}")
    p_new, p_old = _p95(new), _p95(old)
    if p_new is not None and p_old is not None:
        base = max(p_old, LATENCY_FLOOR_MS)
        if p_new > LATENCY_RATIO * base:
            return (f"p95 frame latency {p_new:.0f} ms > {LATENCY_RATIO:g} x the old "
                    f"version's {p_old:.0f} ms (floor {LATENCY_FLOOR_MS:g} ms)")
    return None


# -- scale signals ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeFigures:
    """What the scale signals read of one member."""

    status: str
    capacity: int
    streams: int
    cpu: float  # the node's load, a fraction of its cores
    memory: float | None  # host memory in use, a fraction
    gpu_memory: float | None  # GPU memory in use, a fraction (None: no GPU)


@dataclass(frozen=True, slots=True)
class ScaleSignals:
    members: dict[str, int]  # by Serf status
    capacity: int
    streams: int
    cpu: float
    memory: float
    gpu_memory: float
    recommended_nodes: int


def scale_signals(nodes: Iterable[NodeFigures]) -> ScaleSignals:
    """The cluster's figures (alive members summed) and how many nodes it should have."""
    members: dict[str, int] = {}
    alive: list[NodeFigures] = []
    for n in nodes:
        members[n.status] = members.get(n.status, 0) + 1
        if n.status == "alive":
            alive.append(n)
    capacity = sum(n.capacity for n in alive)
    streams = sum(n.streams for n in alive)
    cpu = sum(n.cpu for n in alive)
    memory = sum(n.memory or 0.0 for n in alive)
    gpu = sum(n.gpu_memory or 0.0 for n in alive)
    per_node = capacity / len(alive) if alive else 0.0
    need = max(streams / (STREAM_TARGET * per_node) if per_node > 0 else 0.0,
               cpu / CPU_TARGET, gpu / GPU_MEMORY_TARGET)
    # A hair of tolerance: 2.8 streams' worth of 0.8 x capacity is 3.5 nodes, not 3.50001.
    return ScaleSignals(members=members, capacity=capacity, streams=streams, cpu=cpu,
                        memory=memory, gpu_memory=gpu,
                        recommended_nodes=max(1, math.ceil(need - 1e-9)))
