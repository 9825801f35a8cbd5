"""Choosing the LiveKit region a session publishes to.

:func:`select_region` is pure: the caller passes the current load and health of every
region, so the choice is reproducible in tests and the node decides where those numbers
come from (gossip, probes, counters).

Ordering among the regions that are usable (healthy and below capacity):

1. a region whose name (or location code) equals a region-code ``user_location`` comes
   first, because the client told us where it is;
2. then the great-circle (haversine) distance from the user to the region; when the user
   location or the region location is unknown (a code that matches nothing, or a region
   given by code only) the distance counts as infinite, so such regions rank after every
   region with a known distance;
3. then the load fraction (``load / capacity``), so between equally near regions the
   emptier one wins;
4. then ``priority`` (lower number first);
5. then ``name``, so the result never depends on the order of the input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rapido.pipeline import geo
from rapido.pipeline.geo import Location, haversine_km

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")



@dataclass(frozen=True, slots=True)
class Region:
    """One LiveKit deployment that sessions may publish to."""

    name: str
    url: str
    capacity: int  # sessions this region accepts from this cluster
    priority: int = 0  # lower is preferred, after distance and load
    location: Location | None = None  # (lat, lon) in degrees, or a region code


def parse_location(value: Any, *, where: str = "location") -> Location | None:
    """A location from JSON/TOML data: ``None``, a region code (surrounding blanks
    ignored), ``{lat, lon}`` or ``[lat, lon]``. Raises ValueError naming ``where``."""
    return geo.parse_location(value.strip() if isinstance(value, str) else value, where=where)


def _sort_key(region: Region, user: Location | None,
              load: Mapping[str, int]) -> tuple[int, float, float, int, str]:
    exact = isinstance(user, str) and (
        region.name == user or (isinstance(region.location, str) and region.location == user))
    if isinstance(user, tuple) and isinstance(region.location, tuple):
        distance = haversine_km(user, region.location)
    else:
        distance = math.inf
    fraction = load.get(region.name, 0) / region.capacity
    return (0 if exact else 1, distance, fraction, region.priority, region.name)


def usable(region: Region, load: Mapping[str, int], healthy: Mapping[str, bool]) -> bool:
    """Below capacity and not known to be failing. A region missing from ``healthy`` is
    treated as healthy: a node that has not probed it yet must still be able to use it."""
    return (healthy.get(region.name, True)
            and load.get(region.name, 0) < region.capacity)


def rank_regions(regions: Iterable[Region], user_location: Location | None,
                 load: Mapping[str, int], healthy: Mapping[str, bool]) -> list[Region]:
    """Every usable region, best first (see the module docstring for the order)."""
    candidates = [r for r in regions if usable(r, load, healthy)]
    return sorted(candidates, key=lambda r: _sort_key(r, user_location, load))


def select_region(regions: Iterable[Region], user_location: Location | None,
                  load: Mapping[str, int], healthy: Mapping[str, bool]) -> Region | None:
    """The best usable region for a user, or ``None`` when every region is full or down."""
    ranked = rank_regions(regions, user_location, load, healthy)
    return ranked[0] if ranked else None


_KEYS = {"name", "url", "capacity", "priority", "location"}


def parse_regions(data: Any) -> list[Region]:
    """Regions from config data (a list of tables, as TOML ``[[regions]]`` gives).

    Every error names the entry (``regions[2].url``) and what is allowed, so the config
    loader can print it as is.
    """
    if not isinstance(data, Sequence) or isinstance(data, str | bytes):
        raise ValueError(f"regions: expected a list of tables, got {type(data).__name__}")
    out: list[Region] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        where = f"regions[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected a table, got {type(item).__name__}")
        unknown = set(item) - _KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; "
                             f"allowed: {sorted(_KEYS)}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"{where}.name: required, [A-Za-z0-9_.-]{{1,64}}, got {name!r}")
        if name in seen:
            raise ValueError(f"{where}.name: duplicate region {name!r}")
        seen.add(name)
        url = item.get("url")
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ValueError(f"{where}.url: required, a ws:// or wss:// URL, got {url!r}")
        capacity = item.get("capacity")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"{where}.capacity: required, an integer >= 1, got {capacity!r}")
        priority = item.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"{where}.priority: an integer, got {priority!r}")
        location = parse_location(item.get("location"), where=f"{where}.location")
        out.append(Region(name, url, capacity, priority, location))
    return out
