"""The home's records of where its lessons play: fed claims, looked at."""

from __future__ import annotations

import math

import pytest

from rapido.cluster.directory import Directory
from rapido.cluster.placement import Claim


def claim(node: str, n: int, at: float = 1000.0) -> Claim:
    return Claim(node, f"{node}.{n:032x}", at)


def test_a_record_is_found_until_its_ttl() -> None:
    d = Directory(ttl_s=60)
    assert d.record("l", claim("a", 1), now=10) is None
    rec = d.lookup("l", now=69.9)
    assert rec is not None and rec.claim == claim("a", 1)
    assert d.lookup("l", now=70) is None
    assert len(d) == 0  # an expired record found is dropped


def test_a_different_session_replaces_and_is_returned_once() -> None:
    d = Directory(ttl_s=60)
    d.record("l", claim("a", 1), now=0)
    # The same session claimed again only refreshes it.
    assert d.record("l", claim("a", 1), now=30) is None
    old = d.record("l", claim("b", 2), now=40)
    assert old is not None and old.claim == claim("a", 1) and old.seen_at == 30
    rec = d.lookup("l", now=95)
    assert rec is not None and rec.claim == claim("b", 2)
    # A replaced record past its time is no double.
    assert d.record("l", claim("c", 3), now=200) is None


def test_forget_only_the_session_named() -> None:
    d = Directory()
    d.record("l", claim("a", 1), now=0)
    assert not d.forget("l", claim("a", 2).session_id)
    assert not d.forget("other", claim("a", 1).session_id)
    assert d.forget("l", claim("a", 1).session_id)
    assert d.lookup("l", now=1) is None


def test_expire_goes_in_order_of_last_sight() -> None:
    d = Directory(ttl_s=10)
    d.record("x", claim("a", 1), now=0)
    d.record("y", claim("a", 2), now=5)
    d.record("x", claim("a", 1), now=6)  # seen again: now the newest
    assert d.expire(now=15) == 1
    assert d.lookup("y", now=15) is None and d.lookup("x", now=15) is not None
    assert d.expire(now=16) == 1 and len(d) == 0


def test_cap_evicts_the_least_recently_seen() -> None:
    d = Directory(max_records=2)
    for i, lesson in enumerate("abc"):
        d.record(lesson, claim("n", i), now=i)
    assert len(d) == 2 and d.evicted == 1
    assert d.lookup("a", now=3) is None


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0}, {"ttl_s": math.inf}, {"ttl_s": "1"},
                                    {"max_records": 0}, {"max_records": True}])
def test_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Directory(**kwargs)  # type: ignore[arg-type]


def test_bad_records() -> None:
    d = Directory()
    with pytest.raises(ValueError, match="lesson"):
        d.record("", claim("a", 1), now=0)
    with pytest.raises(ValueError, match="now"):
        d.record("l", claim("a", 1), now=math.nan)
    assert len(d) == 0
