"""A node's Serf tags: encoded within Serf's limit, decoded with every field checked, and
written on a real change only, at most every 2 s."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapido.cluster.tags import (
    TAG_LIMIT,
    NodeTags,
    TagError,
    TagWriter,
    coarse_free,
    coarse_load,
    decode,
    encode,
    encoded_size,
)

NODE = NodeTags(node_id="gpu-eu-1.3", url="http://10.0.0.7:8083", region="eu-west",
                location=(52.52, 13.405), version="0.1.0", capacity=64, free_slots=37,
                load=0.6234)


def test_round_trip_through_serf_tags() -> None:
    tags = encode(NODE)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())
    peer = decode("gpu-eu-1.3", "alive", tags)
    v = peer.view
    assert peer.url == "http://10.0.0.7:8083"
    assert (v.node_id, v.region, v.version, v.capacity) == ("gpu-eu-1.3", "eu-west",
                                                            "0.1.0", 64)
    assert v.location == (52.52, 13.405)
    assert v.free_slots == 36  # coarse: steps of capacity / 16 = 4
    assert v.load == 0.6  # coarse: steps of 0.05
    assert not v.draining and v.eligible
    drained = decode("gpu-eu-1.3", "alive", encode(NodeTags(**{**_fields(NODE),
                                                               "draining": True})))
    assert drained.view.draining and not drained.view.eligible
    failed = decode("gpu-eu-1.3", "failed", tags)
    assert failed.view.status == "failed" and not failed.view.eligible


def _fields(t: NodeTags) -> dict[str, Any]:
    return {f: getattr(t, f) for f in t.__slots__}


def test_coarse_figures_change_rarely_but_full_stays_exact() -> None:
    assert [coarse_free(f, 64) for f in (64, 63, 61, 60, 4, 3, 1, 0)] == \
        [64, 60, 60, 60, 4, 1, 1, 0]
    assert coarse_free(5, 10) == 5  # capacity under 16: step 1
    assert coarse_free(3, 0) == 0
    assert [coarse_load(x) for x in (0.0, 0.024, 0.026, 0.61, 1.234, -1, 50)] == \
        [0.0, 0.0, 0.05, 0.6, 1.25, 0.0, 9.95]
    assert coarse_load(float("nan")) == 9.95


def test_the_tags_fit_serfs_limit_with_room_to_spare() -> None:
    longest = NodeTags(node_id="n" * 64, url="https://" + "h" * 86 + ":65535",
                       region="r" * 64, location=(-89.9999, -179.9999), version="v" * 32,
                       capacity=100_000, free_slots=99_999, load=9.9, draining=True)
    size = encoded_size(encode(longest))
    assert size <= TAG_LIMIT - 100, size  # later figures (rollout health) need room
    assert encoded_size(encode(NODE)) < 200


@pytest.mark.parametrize(("change", "says"), [
    ({"node_id": "has space"}, "node_id"),
    ({"region": ""}, "region"),
    ({"url": "ftp://x"}, "url"),
    ({"url": "http://x/path"}, "url"),
    ({"url": "http://x:99999"}, "port"),
    ({"version": "1 0"}, "version"),
    ({"capacity": -1}, "capacity"),
    ({"location": (91.0, 0.0)}, "location"),
])
def test_own_bad_fields_are_refused(change: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        encode(NodeTags(**{**_fields(NODE), **change}))


GOOD = encode(NODE)


@pytest.mark.parametrize(("name", "tags", "says"), [
    ("gpu-eu-1.3", {k: v for k, v in GOOD.items() if k != "url"}, "'url' is missing"),
    ("other", GOOD, "must equal its name"),
    ("gpu-eu-1.3", {**GOOD, "cap": "many"}, "'cap' must be a whole number"),
    ("gpu-eu-1.3", {**GOOD, "cap": "²"}, "'cap' must be a whole number"),
    ("gpu-eu-1.3", {**GOOD, "cap": "9" * 5000}, "'cap' must be a short string"),
    ("gpu-eu-1.3", {**GOOD, "free": "65"}, "over 'cap'"),
    ("gpu-eu-1.3", {**GOOD, "ld": "nan"}, "'ld' must be within"),
    ("gpu-eu-1.3", {**GOOD, "ld": "-0.5"}, "'ld' must be within"),
    ("gpu-eu-1.3", {**GOOD, "loc": "52.5"}, "'loc'"),
    ("gpu-eu-1.3", {**GOOD, "loc": "100,0"}, "'loc'"),
    ("gpu-eu-1.3", {**GOOD, "dr": "yes"}, "'dr'"),
    ("gpu-eu-1.3", {**GOOD, "rg": "eu west"}, "'rg'"),
    ("gpu-eu-1.3", {**GOOD, "url": "http://x/?a=1"}, "url"),
    ("gpu-eu-1.3", {**GOOD, "v": 7}, "'v' must be a short string"),
    ("bad name!", {**GOOD, "id": "bad name!"}, "must equal its name"),
])
def test_other_nodes_bad_tags_name_the_tag(name: str, tags: dict[str, object],
                                           says: str) -> None:
    with pytest.raises(TagError, match=says):
        decode(name, "alive", tags)


@given(st.dictionaries(st.sampled_from(["id", "url", "rg", "loc", "v", "cap", "free", "ld",
                                        "dr", "x"]),
                       st.one_of(st.text(max_size=40), st.integers(), st.none(),
                                 st.binary(max_size=8)), max_size=10),
       st.text(max_size=20), st.text(max_size=10))
def test_any_tags_decode_or_raise_tagerror(tags: dict[str, object], name: str,
                                           status: str) -> None:
    try:
        peer = decode(name, status, tags)
    except TagError:
        return
    assert peer.view.node_id == name


def test_writer_writes_real_changes_at_most_every_2_s() -> None:
    w = TagWriter(min_interval_s=2.0)
    a = encode(NODE)
    b = encode(NodeTags(**{**_fields(NODE), "free_slots": 20}))
    assert w.due(a, now=0.0) == a  # the first write is never held back
    w.wrote(a, now=0.0)
    assert w.due(a, now=5.0) is None  # unchanged: nothing to write, however long after
    assert w.due(b, now=1.0) is None  # changed, but too soon
    c = encode(NodeTags(**{**_fields(NODE), "free_slots": 10}))
    assert w.due(c, now=2.0) == c  # the newest state when the interval is up
    w.wrote(c, now=2.0)
    # A change that returns to what is written before the interval is up writes nothing.
    assert w.due(a, now=3.0) is None
    assert w.due(c, now=4.5) is None
    assert w.writes == 2
    # A load wobble inside one coarse step is no change at all.
    d = encode(NodeTags(**{**_fields(NODE), "free_slots": 10, "load": 0.6101}))
    assert d == c and w.due(d, now=10.0) is None
    with pytest.raises(ValueError):
        TagWriter(min_interval_s=float("nan"))


def test_tag_writer_writes_a_drain_at_once() -> None:
    w = TagWriter(min_interval_s=2.0)
    a = encode(NODE)
    w.wrote(a, now=0.0)
    busier = encode(NodeTags(**{**_fields(NODE), "free_slots": 20}))
    assert w.due(busier, now=0.5) is None  # an ordinary change waits for the interval
    draining = encode(NodeTags(**{**_fields(NODE), "free_slots": 20, "draining": True}))
    assert w.due(draining, now=0.5) == draining  # with whatever else changed
    w.wrote(draining, now=0.5)
    assert w.due(draining, now=0.6) is None
    # Back out of draining (a drain that never happens twice, but the rule is symmetric).
    assert w.due(busier, now=0.7) == busier
    # Not urgent: no exception to the interval at all.
    plain = TagWriter(min_interval_s=2.0, urgent=())
    plain.wrote(a, now=0.0)
    assert plain.due(draining, now=0.5) is None


def test_tag_interval_keeps_the_clusters_tag_gossip_within_budget() -> None:
    from rapido.cluster.tags import TAG_BUDGET_KB_S, tag_interval, write_cost_kb
    assert tag_interval(0) == tag_interval(1) == 2.0 and 2.7 < tag_interval(2) < 2.8
    assert round(write_cost_kb(5), 2) == 1.76 and round(write_cost_kb(100), 2) == 5.28
    assert 6.5 < tag_interval(5) < 7.0 and 400 < tag_interval(100) < 410
    # Every member writing as often as it may: each node's tag gossip is at the budget.
    for n in (5, 10, 50, 100, 1000):
        per_node_kb_s = n / tag_interval(n) * write_cost_kb(n)
        assert per_node_kb_s <= TAG_BUDGET_KB_S + 1e-9
    with pytest.raises(ValueError):
        tag_interval(-1)
