"""Where things are: (lat, lon) in degrees, the distance between two, and a location as
JSON or TOML carries it (a region code, ``{lat, lon}`` or ``[lat, lon]``). Shared by the
LiveKit region choice and the cluster's placement, which may not import each other."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

#: Mean Earth radius (IUGG), in km. The choices made by distance are insensitive to it.
EARTH_RADIUS_KM = 6371.0088

#: A region code (and a node id): what a location given as text may be.
REGION_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

LatLon = tuple[float, float]
Location = LatLon | str


def haversine_km(a: LatLon, b: LatLon) -> float:
    """Great-circle distance between two (lat, lon) points in degrees."""
    lat1, lon1 = math.radians(a[0]), math.radians(a[1])
    lat2, lon2 = math.radians(b[0]), math.radians(b[1])
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    # min() guards asin against 1.0000000002 from rounding at antipodes.
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def lat_lon(lat: Any, lon: Any, where: str) -> LatLon:
    """(lat, lon) as floats; ValueError naming ``where`` unless both are finite numbers
    within [-90, 90] and [-180, 180]."""
    for label, v in (("lat", lat), ("lon", lon)):
        # bool is an int subclass; True as a latitude is a mistake, not 1 degree.
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{where}: {label} must be a finite number, got {v!r}")
    if not -90.0 <= lat <= 90.0:
        raise ValueError(f"{where}: lat must be in [-90, 90], got {lat}")
    if not -180.0 <= lon <= 180.0:
        raise ValueError(f"{where}: lon must be in [-180, 180], got {lon}")
    return (float(lat), float(lon))


def parse_location(value: Any, *, where: str = "location") -> Location | None:
    """``None``, a region code, ``{"lat", "lon"}`` or a (lat, lon) pair; ValueError
    naming ``where`` for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        if not REGION_CODE.fullmatch(value):
            raise ValueError(f"{where}: a region code must match [A-Za-z0-9_.-]{{1,64}}, "
                             f"got {value!r}")
        return value
    if isinstance(value, Mapping):
        if set(value) != {"lat", "lon"}:
            raise ValueError(f"{where}: expected {{lat, lon}}, got keys "
                             f"{sorted(map(str, value))}")
        return lat_lon(value["lat"], value["lon"], where)
    if isinstance(value, tuple | list) and len(value) == 2:
        return lat_lon(value[0], value[1], where)
    raise ValueError(f"{where}: expected a region code, {{lat, lon}} or [lat, lon], "
                     f"got {value!r}")
