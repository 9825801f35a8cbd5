"""A node's Serf tags: all that other nodes see of it, and how it is written.

Serf gossips each member's tags with its membership, msgpack-encoded behind a marker
byte, in at most 512 bytes all told (memberlist's node-meta limit), so the keys are short
and the figures coarse: free slots in steps of a sixteenth of the capacity and load in
steps of 0.05. Coarse figures also change less often, and a tag change costs a gossip
round on every node: :class:`TagWriter` writes on a real change only, at most once every
``min_interval_s`` (2 s; :func:`tag_interval` stretches it in a big cluster so the
gossip stays within budget), the newest state winning. Pure: time is an argument.

What arrives from other nodes is input from outside: :func:`decode` checks every field
and raises :class:`TagError` (the caller drops that member from its view and counts it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import msgpack

from rapido.cluster import health
from rapido.cluster.health import NO_HEALTH, Health
from rapido.cluster.placement import NODE_ID, MemberView

#: memberlist's limit on a member's meta (Serf's encoded tags), in bytes.
TAG_LIMIT: Final = 512
#: The tags rapido writes: who the node is and where (id, url, rg, loc, v), its room
#: (cap, free, ld, dr), and for the rollout and the scale signals its streams (st), host
#: and GPU memory in use (mem, gm), its health over the last five minutes (hl,
#: :mod:`rapido.cluster.health`) and the epoch of the rollout state it holds (ro).
KEYS: Final = ("id", "url", "rg", "loc", "v", "cap", "free", "ld", "dr", "st", "mem", "gm",
               "hl", "ro")
LOAD_STEP: Final = 0.05
_VERSION = re.compile(r"[A-Za-z0-9_.+-]{1,32}")
_MAX_URL = 100  # an HTTP URL ("https://gpu-17.eu-west.example.com:8443" is 41)


class TagError(ValueError):
    """Another node's tags are malformed; the message names the tag."""


@dataclass(frozen=True, slots=True)
class NodeTags:
    """What a node publishes of itself."""

    node_id: str
    url: str  # where its HTTP API is reached by the other nodes
    region: str
    location: tuple[float, float] | None
    version: str
    capacity: int
    free_slots: int
    load: float
    draining: bool = False
    streams: int = 0
    memory: float | None = None  # host memory in use, a fraction
    gpu_memory: float | None = None  # GPU memory in use, a fraction; None: no GPU
    health: Health = NO_HEALTH
    rollout_epoch: int = 0


@dataclass(frozen=True, slots=True)
class Peer:
    """A member as this node sees it: its placement view, where to reach it, and the
    figures the rollout and the scale signals read."""

    view: MemberView
    url: str
    streams: int = 0
    memory: float | None = None
    gpu_memory: float | None = None
    health: Health = NO_HEALTH
    rollout_epoch: int = 0


def coarse_free(free_slots: int, capacity: int) -> int:
    """Free slots rounded down to a step of a sixteenth of the capacity (at least 1), but
    never to 0 while one is free: "full" must stay exact, the rest need not."""
    if capacity <= 0 or free_slots <= 0:
        return 0
    step = max(1, capacity // 16)
    return max(1, free_slots // step * step)


def coarse_share(share: float) -> float:
    """A fraction (memory in use) to the nearest 0.05 within 0..1 (NaN counts as full)."""
    if not math.isfinite(share):
        return 1.0
    return round(min(1.0, max(0.0, round(share / LOAD_STEP) * LOAD_STEP)), 2)


def coarse_load(load: float) -> float:
    """Load to the nearest 0.05, clamped to 0..9.95 (NaN counts as fully loaded)."""
    if not math.isfinite(load):
        return 9.95
    return round(min(9.95, max(0.0, round(load / LOAD_STEP) * LOAD_STEP)), 2)


def encoded_size(tags: Mapping[str, str]) -> int:
    """The bytes Serf spends on ``tags``: a marker byte and their msgpack encoding."""
    return 1 + len(msgpack.packb(dict(tags)))


def encode(t: NodeTags) -> dict[str, str]:
    """The node's tags; ValueError if they would not fit Serf's limit or a field is bad."""
    if not NODE_ID.fullmatch(t.node_id):
        raise ValueError(f"node_id {t.node_id!r} must match {NODE_ID.pattern}")
    if not NODE_ID.fullmatch(t.region):
        raise ValueError(f"region {t.region!r} must match {NODE_ID.pattern}")
    _check_url(t.url, ValueError)
    if not _VERSION.fullmatch(t.version):
        raise ValueError(f"version {t.version!r} must match {_VERSION.pattern}")
    if t.capacity < 0 or t.free_slots < 0:
        raise ValueError("capacity and free_slots must be >= 0")
    tags = {"id": t.node_id, "url": t.url, "rg": t.region, "v": t.version,
            "cap": str(t.capacity), "free": str(coarse_free(t.free_slots, t.capacity)),
            "ld": f"{coarse_load(t.load):.2f}"}
    if t.location is not None:
        lat, lon = t.location
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise ValueError(f"location {t.location!r} is not a (lat, lon) in degrees")
        tags["loc"] = f"{lat:.4f},{lon:.4f}"
    if t.draining:
        tags["dr"] = "1"
    if t.streams < 0 or t.rollout_epoch < 0:
        raise ValueError("streams and rollout_epoch must be >= 0")
    tags["st"] = str(t.streams)
    for key, share in (("mem", t.memory), ("gm", t.gpu_memory)):
        if share is not None:
            tags[key] = f"{coarse_share(share):.2f}"
    tags["hl"] = health.encode(t.health)
    tags["ro"] = str(t.rollout_epoch)
    size = encoded_size(tags)
    if size > TAG_LIMIT:
        raise ValueError(f"the node's tags take {size} bytes, over Serf's {TAG_LIMIT}")
    return tags


def decode(name: str, status: str, tags: Mapping[str, object]) -> Peer:
    """Another member from its Serf name, status and tags; TagError names what is wrong."""
    def text(key: str, required: bool = True) -> str | None:
        value = tags.get(key)
        if value is None:
            if required:
                raise TagError(f"member {name!r}: tag {key!r} is missing")
            return None
        if not isinstance(value, str) or len(value) > _MAX_URL:
            raise TagError(f"member {name!r}: tag {key!r} must be a short string")
        return value

    node_id = text("id")
    if node_id != name or not NODE_ID.fullmatch(name):
        raise TagError(f"member {name!r}: tag 'id' must equal its name ({node_id!r})")
    url = text("url")
    assert url is not None
    _check_url(url, TagError)
    region = text("rg")
    assert region is not None
    if not NODE_ID.fullmatch(region):
        raise TagError(f"member {name!r}: tag 'rg' {region!r} is not a region code")
    version = text("v")
    assert version is not None
    if not _VERSION.fullmatch(version):
        raise TagError(f"member {name!r}: tag 'v' {version!r} is not a version")
    capacity = _count(name, "cap", text("cap"))
    free = _count(name, "free", text("free"))
    if free > capacity:
        raise TagError(f"member {name!r}: tag 'free' ({free}) is over 'cap' ({capacity})")
    load = _number(name, "ld", text("ld"))
    location = _location(name, text("loc", required=False))
    draining = text("dr", required=False)
    if draining not in (None, "1"):
        raise TagError(f"member {name!r}: tag 'dr' must be '1' or absent")
    if not isinstance(status, str) or not status:
        raise TagError(f"member {name!r}: status {status!r} is not a Serf status")
    # Added after the first release: a member of an older version carries none of them.
    st, ro = text("st", required=False), text("ro", required=False)
    streams = 0 if st is None else _count(name, "st", st)
    epoch = 0 if ro is None else _count(name, "ro", ro, digits=12)
    memory = _share(name, "mem", text("mem", required=False))
    gpu_memory = _share(name, "gm", text("gm", required=False))
    hl = text("hl", required=False)
    try:
        figures = NO_HEALTH if hl is None else health.decode(hl)
    except ValueError as exc:
        raise TagError(f"member {name!r}: tag 'hl': {exc}") from None
    try:
        view = MemberView(node_id=name, region=region, location=location, capacity=capacity,
                          free_slots=free, load=load, draining=draining == "1",
                          status=status, version=version)
    except ValueError as exc:
        raise TagError(f"member {name!r}: {exc}") from None
    return Peer(view=view, url=url, streams=streams, memory=memory, gpu_memory=gpu_memory,
                health=figures, rollout_epoch=epoch)


def _check_url(url: str, error: type[ValueError]) -> None:
    parts = urlsplit(url)
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or parts.path not in ("", "/") or len(url) > _MAX_URL):
        raise error(f"url {url!r} must be http(s)://host[:port], at most {_MAX_URL} chars")
    try:
        _ = parts.port
    except ValueError:
        raise error(f"url {url!r} has a bad port") from None


def _count(name: str, key: str, value: str | None, digits: int = 7) -> int:
    if value is None or not value.isascii() or not value.isdigit() or len(value) > digits:
        raise TagError(f"member {name!r}: tag {key!r} must be a whole number, got {value!r}")
    return int(value)


def _number(name: str, key: str, value: str | None) -> float:
    try:
        x = float(value or "")
    except ValueError:
        raise TagError(f"member {name!r}: tag {key!r} must be a number, got {value!r}") \
            from None
    if not (math.isfinite(x) and 0.0 <= x <= 100.0):
        raise TagError(f"member {name!r}: tag {key!r} must be within 0..100, got {value!r}")
    return x


def _share(name: str, key: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and 0.0 <= x <= 1.0):
        raise TagError(f"member {name!r}: tag {key!r} must be a fraction within 0..1, "
                       f"got {value!r}")
    return x


def _location(name: str, value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    lat_s, sep, lon_s = value.partition(",")
    try:
        lat, lon = float(lat_s), float(lon_s)
    except ValueError:
        lat = lon = math.nan
    if not sep or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise TagError(f"member {name!r}: tag 'loc' must be 'lat,lon' in degrees, "
                       f"got {value!r}")
    return (lat, lon)


#: Tags whose change is written at once, however soon after the last write: a node
#: that starts draining must stop getting lessons now, not two seconds later.
URGENT: Final = ("dr",)


#: Gossip a node may spend on the cluster's tag writes, KB/s sent + received: the 2 KB/s
#: budget less the ~0.7 KB/s of idle gossip (bench cluster, BENCHMARKS.md).
TAG_BUDGET_KB_S: Final = 1.3
#: What one tag write costs each node, KB sent + received, per retransmission: measured
#: 1.8 KB at 5 agents (4 transmissions), ~5 KB at 100 (12).
_WRITE_KB_PER_TRANSMISSION: Final = 0.44


def write_cost_kb(members: int) -> float:
    """KB one tag write costs every node of a cluster of ``members``: memberlist
    retransmits a broadcast 4 x ceil(log10(N + 1)) times."""
    return _WRITE_KB_PER_TRANSMISSION * 4 * math.ceil(math.log10(max(1, members) + 1))


def tag_interval(members: int, floor_s: float = 2.0) -> float:
    """How long a node waits between tag writes in a cluster of ``members`` alive
    members, so that all of them writing as often as they may keep each node's gossip
    for tags within :data:`TAG_BUDGET_KB_S`: 2 s alone, 4 s at 3, 7 s at 5, 135 s at
    50, 406 s at 100. Tags change on coarse steps only, so in a steady cluster they are
    written far less often than this; a draining node's tag goes at once (``urgent``),
    and placement copes with stale free slots (a full node refuses; the next is asked)."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 0:
        raise ValueError(f"members must be an integer >= 0, got {members!r}")
    return max(floor_s, members * write_cost_kb(members) / TAG_BUDGET_KB_S)


class TagWriter:
    """When to write the node's tags: on a real change only, at most every
    ``min_interval_s``; a change made meanwhile is written when the interval is up (the
    newest one: intermediate states are never written). A change of an ``urgent`` tag
    (draining) is written at once, with whatever else changed."""

    def __init__(self, min_interval_s: float = 2.0,
                 urgent: tuple[str, ...] = URGENT) -> None:
        if not min_interval_s >= 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.min_interval_s = min_interval_s
        self.urgent = urgent
        self.written: dict[str, str] | None = None
        self._written_at = -math.inf
        self.writes = 0

    def due(self, tags: Mapping[str, str], now: float) -> dict[str, str] | None:
        """The tags to write now, or None (unchanged, or too soon after the last)."""
        current = dict(tags)
        written = self.written
        if current == written:
            return None
        if written is not None and any(current.get(k) != written.get(k)
                                       for k in self.urgent):
            return current
        if now - self._written_at < self.min_interval_s:
            return None
        return current

    def wrote(self, tags: Mapping[str, str], now: float) -> None:
        """The agent accepted ``tags`` at ``now``."""
        self.written = dict(tags)
        self._written_at = now
        self.writes += 1
