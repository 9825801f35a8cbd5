"""Adaptive publisher quality: bitrate follows the connection, frame rate the node.

Pure and synchronous, like the jitter buffer: feed it receiver reports, REMB
estimates and load samples with the time they were seen, then read
:meth:`QualityController.update`. The sinks own the I/O (RTCP arrives on aiortc's
transports, load comes from the engine once a second) and apply what it decides.

Bitrate (the connection): one loss-based estimate per receiver, as in Google
Congestion Control's sender side: a report with more than 10 % loss cuts the
estimate by half the loss (``est *= 1 - loss/2``), one under 2 % raises it by 8 %,
in between it holds. A receiver's REMB caps its estimate. One encoder serves every
viewer of a stream, so the encoder follows a low quantile of the receivers'
estimates (the worst of up to five): a viewer below it still gets every packet it
can take and is resynchronised at a keyframe when its queue overflows.

Frame rate (the node): the load sample is the share of the node's CPU in use, or
1.0 and more when frames leave late. Above ``high_load`` for ``down_after_s`` the
frame rate takes one step down a ladder (25 → 20 → 15 → 12.5 ... down to the floor);
when the load scaled to the next rung up (``load x next/current``, as if all of it
grew with the frame rate, which overstates it) stays below ``high_load`` for
``up_after_s`` it takes one step back up. Down is quick and up is slow; a step up
that is undone within ``probe_window_s`` was a failed probe and doubles the wait
before the next one (up to ``max_up_wait_s``), so a node whose limit sits between
two rungs settles instead of oscillating. Fewer encoded frames is what
frees CPU; bitrate barely changes an encoder's cost, frame rate does almost linearly.

Changes reach the encoder at most once per ``min_interval_s`` (a frame rate step
down, which relieves an overloaded node, at once) and only when the bitrate moved by
``min_change`` or the frame rate changed: re-opening an encoder (which a bitrate
change needs) costs a keyframe; a frame rate change only thins the frames encoded.

Score: ``fps/max_fps x (0.5 + 0.5 x b)`` where ``b`` places the bitrate between the
bounds on a log scale (0 at the floor, 1 at the ceiling): 1.0 is full quality, half
the frame rate at full bitrate is 0.5, full frame rate at the bitrate floor is 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final

#: Loss above which an estimate is cut, below which it grows (GCC's thresholds).
LOSS_HIGH: Final = 0.10
LOSS_LOW: Final = 0.02
GROWTH: Final = 1.08
#: Share of the frame rate ceiling at each rung of the ladder, before the floor.
LADDER: Final = (Fraction(1), Fraction(4, 5), Fraction(3, 5), Fraction(1, 2),
                 Fraction(2, 5), Fraction(1, 4), Fraction(1, 5))


@dataclass(frozen=True, slots=True)
class QualityBounds:
    """What the controller may choose between (configured per node)."""

    min_bitrate: int
    max_bitrate: int
    min_fps: float
    max_fps: float

    def __post_init__(self) -> None:
        if not 0 < self.min_bitrate <= self.max_bitrate:
            raise ValueError(f"bitrate bounds must satisfy 0 < min <= max, got "
                             f"{self.min_bitrate}..{self.max_bitrate}")
        if not 0 < self.min_fps <= self.max_fps:
            raise ValueError(f"frame rate bounds must satisfy 0 < min <= max, got "
                             f"{self.min_fps}..{self.max_fps}")

    def ladder(self) -> list[Fraction]:
        """Frame rates to step through, highest first, ending at the floor."""
        top = Fraction(self.max_fps).limit_denominator(1000)
        floor = Fraction(self.min_fps).limit_denominator(1000)
        rungs = [top * r for r in LADDER if top * r > floor]
        return [*rungs, floor] if floor not in rungs else rungs


@dataclass(frozen=True, slots=True)
class Quality:
    bitrate: int
    fps: Fraction
    score: float
    #: What holds quality down right now: "cpu", "bandwidth", or None (like WebRTC's
    #: qualityLimitationReason).
    limited_by: str | None

    def as_json(self) -> dict[str, object]:
        return {"bitrate": self.bitrate, "fps": float(self.fps), "score": round(self.score, 3),
                "limited_by": self.limited_by}


@dataclass(slots=True)
class _Receiver:
    estimate: float
    seen: float
    remb: float | None = None
    remb_seen: float = 0.0
    loss: float = 0.0
    reports: int = 0

    def effective(self, now: float, stale_after_s: float) -> float:
        if self.remb is not None and now - self.remb_seen <= stale_after_s:
            return min(self.estimate, self.remb)
        return self.estimate


@dataclass(slots=True)
class _Applied:
    bitrate: int
    fps: Fraction
    at: float


@dataclass
class QualityController:
    bounds: QualityBounds
    high_load: float = 0.85
    down_after_s: float = 1.0
    up_after_s: float = 5.0
    probe_window_s: float = 10.0
    max_up_wait_s: float = 80.0
    min_change: float = 0.15
    min_interval_s: float = 2.0
    stale_after_s: float = 10.0
    #: Which low quantile of the receivers' estimates the shared encoder follows.
    receiver_quantile: float = 0.2

    _receivers: dict[str, _Receiver] = field(default_factory=dict, init=False)
    _ladder: list[Fraction] = field(default_factory=list, init=False)
    _rung: int = field(default=0, init=False)
    _over_since: float | None = field(default=None, init=False)
    _under_since: float | None = field(default=None, init=False)
    _load: float = field(default=0.0, init=False)
    _up_wait: float = field(default=0.0, init=False)
    _last_up: float | None = field(default=None, init=False)
    _applied: _Applied | None = field(default=None, init=False)
    changes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not self.high_load > 0:
            raise ValueError("high_load must be > 0")
        self._ladder = self.bounds.ladder()
        self._up_wait = self.up_after_s

    # -- inputs ------------------------------------------------------------------

    def on_receiver_report(self, receiver: str, fraction_lost: float, now: float) -> None:
        """One RTCP receiver report block: ``fraction_lost`` in 0..1 since the last."""
        if not 0.0 <= fraction_lost <= 1.0:
            raise ValueError(f"fraction_lost must be within 0..1, got {fraction_lost}")
        r = self._receiver(receiver, now)
        r.seen = now
        r.loss = fraction_lost
        r.reports += 1
        b = self.bounds
        if fraction_lost > LOSS_HIGH:
            r.estimate *= 1.0 - fraction_lost / 2
        elif fraction_lost < LOSS_LOW:
            r.estimate *= GROWTH
        r.estimate = min(float(b.max_bitrate), max(float(b.min_bitrate), r.estimate))

    def on_remb(self, receiver: str, bitrate: float, now: float) -> None:
        """A receiver's estimated maximum bitrate (bits/s)."""
        if not bitrate >= 0:
            raise ValueError(f"REMB bitrate must be >= 0, got {bitrate}")
        r = self._receiver(receiver, now)
        r.seen = now
        r.remb = float(bitrate)
        r.remb_seen = now

    def forget(self, receiver: str) -> None:
        self._receivers.pop(receiver, None)

    def on_load(self, load: float, now: float) -> None:
        """One sample of node load: 1.0 is a node at its limit."""
        if not load >= 0:
            raise ValueError(f"load must be >= 0, got {load}")
        self._load = load
        if self._last_up is not None and now - self._last_up >= self.probe_window_s:
            self._up_wait = self.up_after_s  # the last step up held: probes are cheap again
            self._last_up = None
        if load > self.high_load:
            self._under_since = None
            if self._over_since is None:
                self._over_since = now
            elif now - self._over_since >= self.down_after_s:
                if self._rung < len(self._ladder) - 1:
                    self._rung += 1
                    if self._last_up is not None:  # the last step up did not hold
                        self._up_wait = min(self.max_up_wait_s, 2 * self._up_wait)
                        self._last_up = None
                self._over_since = now  # the next step needs another full period
        elif self._rung > 0 and load * self._ladder[self._rung - 1] / self._ladder[self._rung] \
                < self.high_load:
            self._over_since = None
            if self._under_since is None:
                self._under_since = now
            elif now - self._under_since >= self._up_wait:
                if self._rung > 0:
                    self._rung -= 1
                    self._last_up = now
                self._under_since = now
        else:
            self._over_since = self._under_since = None

    # -- output ------------------------------------------------------------------

    def target_bitrate(self, now: float) -> int:
        live = sorted(r.effective(now, self.stale_after_s) for r in self._receivers.values()
                      if now - r.seen <= self.stale_after_s)
        if not live:
            return self.bounds.max_bitrate
        est = live[int(self.receiver_quantile * (len(live) - 1))]
        return int(min(self.bounds.max_bitrate, max(self.bounds.min_bitrate, est)))

    def target_fps(self) -> Fraction:
        return self._ladder[self._rung]

    def update(self, now: float) -> Quality:
        """What the encoder should run at now (changes only as often as allowed)."""
        bitrate, fps = self.target_bitrate(now), self.target_fps()
        a = self._applied
        if a is None:
            self._applied = _Applied(bitrate, fps, now)
        elif (bitrate, fps) != (a.bitrate, a.fps) and (
                now - a.at >= self.min_interval_s or fps < a.fps):
            # An overloaded node sheds frames at once; everything else waits its turn.
            moved = abs(bitrate - a.bitrate) / a.bitrate >= self.min_change
            # Reaching a bound always counts, so the estimate can settle exactly there.
            at_bound = bitrate != a.bitrate and bitrate in (self.bounds.min_bitrate,
                                                            self.bounds.max_bitrate)
            if fps != a.fps or moved or at_bound:
                self._applied = _Applied(bitrate if moved or at_bound else a.bitrate, fps, now)
                self.changes += 1
        return self.quality()

    def quality(self) -> Quality:
        a = self._applied
        b = self.bounds
        bitrate, fps = (b.max_bitrate, self._ladder[0]) if a is None else (a.bitrate, a.fps)
        return Quality(bitrate, fps, score(bitrate, fps, b), self._limited_by(bitrate, fps))

    def _limited_by(self, bitrate: int, fps: Fraction) -> str | None:
        if fps < self._ladder[0]:
            return "cpu"
        if bitrate < self.bounds.max_bitrate:
            return "bandwidth"
        return None

    def receivers(self) -> dict[str, dict[str, float | int | None]]:
        return {k: {"estimate": int(r.estimate), "remb": r.remb, "loss": r.loss,
                    "reports": r.reports} for k, r in sorted(self._receivers.items())}

    @property
    def load(self) -> float:
        return self._load

    def _receiver(self, receiver: str, now: float) -> _Receiver:
        r = self._receivers.get(receiver)
        if r is None:
            # A new viewer starts where the encoder is, not at the ceiling: it has no
            # history that says the ceiling is safe for it, nor that it is not.
            start = self._applied.bitrate if self._applied else self.bounds.max_bitrate
            r = self._receivers[receiver] = _Receiver(float(start), now)
        return r


@dataclass(slots=True)
class Backlog:
    """A publisher's own side of the load: whether its queue keeps up.

    ``sample`` takes the queue's fill (0..1) and the running totals of chunks dropped
    and chunks offered; it returns the load this publisher adds (its fill, or 1.5 if it
    dropped anything since the last sample: it is not keeping up, whatever the node
    says) and keeps ``delivered``, the share of chunks not dropped, smoothed over a few
    samples because drops come in bursts (a full queue), not evenly."""

    delivered: float = 1.0
    _dropped: int = 0
    _offered: int = 0

    def sample(self, *, fill: float, dropped: int, offered: int) -> float:
        new_dropped, new_offered = dropped - self._dropped, offered - self._offered
        self._dropped, self._offered = dropped, offered
        share = 1.0 - new_dropped / new_offered if new_offered > 0 else 1.0
        self.delivered = 0.7 * self.delivered + 0.3 * share
        return 1.5 if new_dropped else fill


class NodeLoad:
    """The node's load between two samples, what publishers adapt their frame rate to.

    The share of its cores the process used, or the share of frames that left more
    than a frame late x 20 if more: 5 % late reads as a node at its limit, whatever the
    CPU says; one late frame of one stream's 25 a second is a hiccup, 0.8, which holds
    but does not degrade. Clamped to 0..2. Pure: the caller passes the clocks."""

    def __init__(self, cores: int, wall: float, cpu: float) -> None:
        if cores < 1:
            raise ValueError(f"cores must be >= 1, got {cores}")
        self.cores = cores
        self.frames = 0
        self.late = 0
        self._mark = (wall, cpu, 0, 0)

    def frame(self, late: bool) -> None:
        """One frame handed to a sink; ``late``: more than a frame interval late."""
        self.frames += 1
        self.late += late

    def sample(self, wall: float, cpu: float) -> float:
        """The load since the last sample (``wall`` and ``cpu`` in seconds: a monotonic
        clock and the process's CPU time)."""
        w0, c0, f0, l0 = self._mark
        self._mark = (wall, cpu, self.frames, self.late)
        util = (cpu - c0) / max(1e-3, wall - w0) / self.cores
        seen = self.frames - f0
        late_share = (self.late - l0) / seen if seen > 0 else 0.0
        return max(0.0, util, min(2.0, late_share * 20))


class PublisherQuality:
    """Adaptive quality as a publishing sink runs it: its controller, its own backlog,
    and the target its encoder follows. Both publishers (webrtc, LiveKit) own one.

    ``adapt`` is the engine's once-a-second load sample: the node's load, or this
    publisher's own if worse (its queue's fill, or 1.5 when it dropped chunks since the
    last sample, see :class:`Backlog`). ``target`` is what the encoder runs at now,
    replaced whole (one reference store), so an encoder thread may read it per frame.
    ``score`` is the controller's score less the chunks dropped lately (those are
    stutter, not a chosen lower frame rate)."""

    def __init__(self, bounds: QualityBounds, now: float) -> None:
        self.controller = QualityController(bounds)
        self.backlog = Backlog()  # drops are stutter: they count as load and in the score
        self.target: Quality = self.controller.update(now)

    @property
    def bounds(self) -> QualityBounds:
        return self.controller.bounds

    def adapt(self, node_load: float, now: float, *, fill: float, dropped: int,
              offered: int) -> Quality:
        """One load sample: ``fill``, ``dropped`` and ``offered`` as for
        :meth:`Backlog.sample`. Returns the new target."""
        own = self.backlog.sample(fill=fill, dropped=dropped, offered=offered)
        self.controller.on_load(max(node_load, own), now)
        return self.retarget(now)

    def retarget(self, now: float) -> Quality:
        """Let the controller's latest inputs reach the target (as often as allowed)."""
        self.target = self.controller.update(now)
        return self.target

    def keep(self, index: int, source_fps: int) -> bool:
        """Whether frame ``index`` is encoded at the target frame rate (see
        :func:`keep_frame`); audio is never thinned."""
        return keep_frame(index, self.target.fps, source_fps)

    def quality(self) -> Quality:
        """What the controller has chosen (its score counts bitrate and frame rate)."""
        return self.controller.quality()

    def score(self) -> float:
        """The publisher's score: the controller's, less recent stutter."""
        return self.controller.quality().score * self.backlog.delivered

def score(bitrate: int, fps: Fraction | float, bounds: QualityBounds) -> float:
    fps_part = min(1.0, float(fps) / bounds.max_fps)
    if bounds.max_bitrate == bounds.min_bitrate:
        b = 1.0
    else:
        b = math.log(bitrate / bounds.min_bitrate) / math.log(bounds.max_bitrate
                                                               / bounds.min_bitrate)
    return fps_part * (0.5 + 0.5 * min(1.0, max(0.0, b)))


def keep_frame(index: int, fps: Fraction, source_fps: int) -> bool:
    """Whether frame ``index`` of a ``source_fps`` stream is sent at ``fps``: evenly
    spaced, e.g. every other frame at half rate, four in five at 4/5."""
    if fps >= source_fps:
        return True
    ratio = Fraction(fps) / source_fps
    return index == 0 or math.floor(index * ratio) > math.floor((index - 1) * ratio)
