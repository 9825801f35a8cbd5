"""Region selection and the regions config parser."""

from __future__ import annotations

import math

import pytest

from rapido.livekit.regions import (
    Region,
    haversine_km,
    parse_location,
    parse_regions,
    rank_regions,
    select_region,
)

FRA = Region("eu-fra", "wss://fra.example", 10, 0, (50.11, 8.68))
IAD = Region("us-iad", "wss://iad.example", 10, 0, (38.95, -77.45))
SIN = Region("ap-sin", "wss://sin.example", 10, 0, (1.35, 103.99))
ALL = [FRA, IAD, SIN]
BERLIN = (52.52, 13.40)


def test_haversine_known_distance() -> None:
    # Paris - London is about 344 km.
    assert haversine_km((48.8566, 2.3522), (51.5074, -0.1278)) == pytest.approx(344, abs=3)
    assert haversine_km((0, 0), (0, 180)) == pytest.approx(math.pi * 6371.0088)


def test_nearest_wins() -> None:
    assert select_region(ALL, BERLIN, {}, {}) is FRA
    assert select_region(ALL, (40.7, -74.0), {}, {}) is IAD
    assert select_region(ALL, (-33.9, 151.2), {}, {}) is SIN


def test_full_and_unhealthy_are_skipped() -> None:
    assert select_region(ALL, BERLIN, {"eu-fra": 10}, {}) is IAD
    assert select_region(ALL, BERLIN, {}, {"eu-fra": False}) is IAD
    assert select_region(ALL, BERLIN, {"eu-fra": 10, "us-iad": 11, "ap-sin": 10}, {}) is None
    assert select_region([], BERLIN, {}, {}) is None


def test_region_code_matches_first() -> None:
    assert select_region(ALL, "ap-sin", {}, {}) is SIN
    coded = Region("x", "wss://x", 5, 0, "sin")
    assert select_region([FRA, coded], "sin", {}, {}) is coded


def test_ties_load_then_priority_then_name() -> None:
    a = Region("b", "wss://b", 10, 1, (50.0, 8.0))
    b = Region("a", "wss://a", 10, 1, (50.0, 8.0))
    c = Region("c", "wss://c", 10, 0, (50.0, 8.0))
    # Same distance: priority 0 first, then name.
    assert [r.name for r in rank_regions([a, b, c], BERLIN, {}, {})] == ["c", "a", "b"]
    # Load fraction beats priority.
    assert [r.name for r in rank_regions([a, b, c], BERLIN, {"c": 5}, {})] == ["a", "b", "c"]
    # Input order never matters.
    assert rank_regions([c, b, a], BERLIN, {}, {}) == rank_regions([a, b, c], BERLIN, {}, {})


def test_unknown_location_falls_back_to_load_and_priority() -> None:
    low = Region("low", "wss://l", 10, 5, (0.0, 0.0))
    high = Region("high", "wss://h", 10, 1, (10.0, 10.0))
    assert select_region([low, high], None, {}, {}) is high
    assert select_region([low, high], "nowhere", {}, {}) is high
    # A region without coordinates ranks after regions with a known distance.
    nocoord = Region("nc", "wss://n", 10, -5, None)
    assert select_region([nocoord, FRA], BERLIN, {}, {}) is FRA


def test_parse_regions_ok() -> None:
    regions = parse_regions([
        {"name": "eu-fra", "url": "wss://fra", "capacity": 50,
         "location": {"lat": 50.1, "lon": 8.7}},
        {"name": "us", "url": "ws://us", "capacity": 5, "priority": 2, "location": "us"},
        {"name": "z", "url": "wss://z", "capacity": 1, "location": [1, 2]},
    ])
    assert regions[0] == Region("eu-fra", "wss://fra", 50, 0, (50.1, 8.7))
    assert regions[1].location == "us" and regions[1].priority == 2
    assert regions[2].location == (1.0, 2.0)


@pytest.mark.parametrize(("data", "match"), [
    ("nope", "a list"),
    ([1], r"regions\[0\]: expected a table"),
    ([{"url": "wss://a", "capacity": 1}], r"regions\[0\]\.name"),
    ([{"name": "a", "url": "http://a", "capacity": 1}], r"regions\[0\]\.url"),
    ([{"name": "a", "url": "wss://a", "capacity": 0}], "capacity"),
    ([{"name": "a", "url": "wss://a", "capacity": True}], "capacity"),
    ([{"name": "a", "url": "wss://a", "capacity": 1, "priority": "x"}], "priority"),
    ([{"name": "a", "url": "wss://a", "capacity": 1, "colour": 1}], "unknown key"),
    ([{"name": "a", "url": "wss://a", "capacity": 1, "location": {"lat": 91, "lon": 0}}],
     "lat must be"),
    ([{"name": "a", "url": "wss://a", "capacity": 1},
      {"name": "a", "url": "wss://b", "capacity": 1}], "duplicate"),
])
def test_parse_regions_errors(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_regions(data)


def test_parse_location() -> None:
    assert parse_location(None) is None
    assert parse_location("eu") == "eu"
    assert parse_location({"lat": 1, "lon": -2}) == (1.0, -2.0)
    for bad in ({"lat": 1}, {"lat": float("nan"), "lon": 0}, [1, 2, 3], "has space", 5):
        with pytest.raises(ValueError):
            parse_location(bad)
