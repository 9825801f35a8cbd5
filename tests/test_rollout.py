"""The rollout's pure parts: buckets, the plan, the phase schedule, the state's events
(``rapido.cluster.rollout``); the health window, the rollback rule and the scale
signals (``rapido.cluster.health``); what a node gossips of them (``tags``)."""

from __future__ import annotations

import hashlib
import math

import orjson
import pytest

from rapido.cluster import health
from rapido.cluster.health import (
    Health,
    HealthWindow,
    NodeFigures,
    quantile,
    rollback_reason,
    scale_signals,
    two_figures,
)
from rapido.cluster.rollout import (
    ABORTED,
    COMPLETE,
    NONE,
    ROLLED_BACK,
    RUNNING,
    Phase,
    PlanError,
    RolloutState,
    apply_event,
    bucket,
    end_event,
    parse_plan,
    start_event,
    state_from_json,
)
from rapido.cluster.tags import TAG_LIMIT, NodeTags, TagError, decode, encode, encoded_size

# md5 of these is public (RFC 1321's test suite has ""; the rest any md5 tool shows):
# the bucket is the first 8 hex digits as a number, modulo 100.
KNOWN = [("", "d41d8cd9", 93), ("0", "cfcd2084", 16), ("alice", "6384e2b2", 70),
         ("bob", "9f9d51bc", 20), ("user-1", "d6d77053", 19), ("user-42", "7631bc07", 87),
         ("lesson-physics-7", "0e829a7d", 53), ("Ünïcode", "6c51cc17", 91)]


@pytest.mark.parametrize(("user", "prefix", "expected"), KNOWN)
def test_buckets_are_md5_of_the_user(user: str, prefix: str, expected: int) -> None:
    assert hashlib.md5(user.encode()).hexdigest()[:8] == prefix
    assert int(prefix, 16) % 100 == expected
    assert bucket(user) == expected


def test_buckets_spread_evenly_and_refuse_non_strings() -> None:
    buckets = [bucket(f"user-{i}") for i in range(20_000)]
    for percent in (10, 25, 50):  # the plan's shares, within 1 % of 20 000 users
        assert abs(sum(b < percent for b in buckets) / 20_000 - percent / 100) < 0.01
    with pytest.raises(TypeError):
        bucket(42)  # type: ignore[arg-type]


PLAN = {"version": "1.1.0", "phases": [{"percent": 10, "duration_s": 10},
                                       {"percent": 25, "duration_s": 20},
                                       {"percent": 50, "duration_s": 30},
                                       {"percent": 100, "duration_s": 40}]}


def test_a_plan_parses_and_its_phases_advance_on_time() -> None:
    version, phases = parse_plan(PLAN, {"1.0.0", "1.1.0"})
    assert version == "1.1.0" and [p.percent for p in phases] == [10, 25, 50, 100]
    s = RolloutState(epoch=3, id="ab" * 8, version=version, phases=phases,
                     started_at=1000.0, state=RUNNING)
    expected = {999.0: 10, 1000.0: 10, 1009.9: 10, 1010.0: 25, 1029.9: 25, 1030.0: 50,
                1059.9: 50, 1060.0: 100, 1099.9: 100, 1100.0: 100, 5000.0: 100}
    assert {t: s.percent(t) for t in expected} == expected
    assert s.at(1099.0).state == RUNNING and s.at(1100.0).state == COMPLETE
    shown = s.to_json(1015.0)
    assert (shown["percent"], shown["phase"], shown["next_phase_at"]) == (25, 2, 1030.0)
    assert s.to_json(1200.0)["state"] == COMPLETE and "phase" not in s.to_json(1200.0)
    # A user's bucket decides, and one who got the new version keeps it as it grows.
    users = [f"u{i}" for i in range(300)]
    early = {u for u in users if s.new_version_for(u, 1005.0)}
    later = {u for u in users if s.new_version_for(u, 1040.0)}
    assert early == {u for u in users if bucket(u) < 10} and early < later
    assert later == {u for u in users if bucket(u) < 50}
    assert RolloutState().new_version_for("u1", 0.0) is None


@pytest.mark.parametrize(("body", "code"), [
    ({**PLAN, "version": "9.9.9"}, "unknown_version"),
    ({**PLAN, "version": "bad version!"}, "invalid_version"),
    ({**PLAN, "version": 7}, "invalid_version"),
    ({"version": "1.1.0", "phases": [{"percent": 0, "duration_s": 1}]}, "percent_out_of_range"),
    ({"version": "1.1.0", "phases": [{"percent": 101, "duration_s": 1}]},
     "percent_out_of_range"),
    ({"version": "1.1.0", "phases": [{"percent": 12.5, "duration_s": 1}]},
     "percent_out_of_range"),
    ({"version": "1.1.0", "phases": [{"percent": True, "duration_s": 1}]},
     "percent_out_of_range"),
    ({"version": "1.1.0", "phases": [{"percent": 50, "duration_s": 1},
                                     {"percent": 25, "duration_s": 1}]}, "phases_out_of_order"),
    ({"version": "1.1.0", "phases": [{"percent": 25, "duration_s": 1},
                                     {"percent": 25, "duration_s": 1}]}, "phases_out_of_order"),
    ({"version": "1.1.0", "phases": []}, "invalid_phases"),
    ({"version": "1.1.0", "phases": [{"percent": 10, "duration_s": 1}] * 11}, "invalid_phases"),
    ({"version": "1.1.0", "phases": [{"percent": 10, "duration_s": 0}]}, "invalid_phases"),
    ({"version": "1.1.0", "phases": [{"percent": 10, "duration_s": -5}]}, "invalid_phases"),
    ({"version": "1.1.0", "phases": [{"percent": 10, "duration_s": math.inf}]}, "invalid_phases"),
    ({"version": "1.1.0", "phases": [{"percent": 10}]}, "invalid_phases"),
    ({"version": "1.1.0", "phases": [{"percent": 10, "duration_s": 1, "x": 1}]},
     "invalid_phases"),
    ({"version": "1.1.0", "phases": "10,25"}, "invalid_phases"),
    ({**PLAN, "extra": 1}, "invalid_rollout"),
    ([PLAN], "invalid_rollout"),
])
def test_bad_plans_are_refused_naming_the_rule(body: object, code: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(body, {"1.0.0", "1.1.0"})
    assert info.value.code == code and str(info.value)


def _started(ltime: int = 5, rid: str = "0123456789abcdef") -> RolloutState:
    payload = start_event(rid, "1.1.0", (Phase(25, 60.0), Phase(100, 60.0)), 1000.0, "a1")
    s = apply_event(RolloutState(), payload, ltime)
    assert s is not None
    return s


def test_events_apply_in_lamport_order_and_duplicates_change_nothing() -> None:
    s = _started()
    assert (s.state, s.epoch, s.version, s.by, s.percent(1001.0)) == (RUNNING, 5, "1.1.0",
                                                                      "a1", 25)
    # An event older than the state (or as old) changes nothing.
    assert apply_event(s, end_event("abort", s.id, 1002.0, "a2", "x"), 5) is None
    # A rollback of another rollout is stale.
    assert apply_event(s, end_event("rollback", "f" * 16, 1002.0, "b1", "x"), 9) is None
    rolled = apply_event(s, end_event("rollback", s.id, 1002.0, "b1", "error rate"), 7)
    assert rolled is not None
    assert (rolled.state, rolled.epoch, rolled.reason, rolled.by) == (ROLLED_BACK, 7,
                                                                      "error rate", "b1")
    # 0 %: everyone's new sessions avoid the version rolled back, "bob" (bucket 20) too.
    assert rolled.percent(1003.0) == 0 and rolled.new_version_for("bob", 1003.0) is False
    assert s.new_version_for("bob", 1003.0) is True
    # A second rollback of the same rollout (two nodes crossed) is ignored.
    assert apply_event(rolled, end_event("rollback", s.id, 1002.5, "a1", "late"), 8) is None
    # A newer start replaces whatever was there: the latest wins.
    again = apply_event(rolled, start_event("fedcba9876543210", "1.1.0", (Phase(10, 5.0),),
                                            1010.0, "a2"), 12)
    assert again is not None and again.state == RUNNING and again.epoch == 12
    aborted = apply_event(again, end_event("abort", again.id, 1011.0, "a2", "op"), 13)
    assert aborted is not None and aborted.state == ABORTED and aborted.percent(1011.0) == 0


@pytest.mark.parametrize("payload", [
    b"not json", b"[]", b'{"op": "upgrade"}',
    b'{"op": "start", "id": "zz", "version": "1", "phases": [[1, 1]], "at": 1, "by": "a"}',
    b'{"op": "start", "id": "0123456789abcdef", "version": "1", "phases": [[0, 1]], '
    b'"at": 1, "by": "a"}',
    b'{"op": "start", "id": "0123456789abcdef", "version": "1", "phases": [], "at": 1, '
    b'"by": "a"}',
    b'{"op": "rollback", "of": "0123456789abcdef", "at": "soon", "by": "a", "reason": "x"}',
    b'{"op": "rollback", "of": "0123456789abcdef", "at": 1, "by": "a", "reason": 5}',
])
def test_malformed_events_raise_and_change_nothing(payload: bytes) -> None:
    s = _started()
    with pytest.raises(ValueError):
        apply_event(s, payload, 99)
    assert s.state == RUNNING and s.epoch == 5


def test_a_state_handed_over_by_a_peer_reads_back_the_same() -> None:
    s = _started()
    rolled = apply_event(s, end_event("rollback", s.id, 1002.0, "b1", "p95"), 7)
    assert rolled is not None
    for state in (RolloutState(), s, rolled):
        back = state_from_json(orjson.loads(orjson.dumps(state.to_json())))
        assert back == state
    # As the API shows it (now given), a complete one reads back as running, same times.
    shown = orjson.loads(orjson.dumps(s.to_json(5000.0)))
    assert shown["state"] == COMPLETE and state_from_json(shown).at(5000.0).state == COMPLETE
    bad: object
    for bad in ({}, {"epoch": -1, "state": NONE}, {"epoch": 1, "state": "weird"},
                {**s.to_json(), "phases": "x"}, {**s.to_json(), "reason": 5}, []):
        with pytest.raises(ValueError):
            state_from_json(bad)


# -- health ------------------------------------------------------------------------------

BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5, 1.0,
          math.inf)


def _cumulative(latencies_s: list[float]) -> tuple[int, ...]:
    return tuple(sum(x <= b for x in latencies_s) for b in BOUNDS)


def test_the_window_slides_over_ended_sessions_latency_and_gpu_errors() -> None:
    w = HealthWindow(BOUNDS, window_s=300.0, slot_s=10.0)
    w.sample(0.0, _cumulative([]), 0)
    assert w.figures(0.0) == Health()
    w.session_ended(5.0, error=True, underruns=3)
    w.session_ended(6.0, error=False, underruns=30)
    frames = [0.004] * 900 + [0.15] * 100  # p95 inside the 0.12..0.2 bucket
    w.sample(20.0, _cumulative(frames), 2)
    f = w.figures(20.0)
    assert (f.ended, f.errors, f.underruns, f.gpu_memory_errors, f.frames) == (2, 1, 33, 2, 1000)
    assert f.p95_ms is not None and 120.0 < f.p95_ms < 200.0
    assert f.p95_ms == pytest.approx(1000 * quantile(BOUNDS, _cumulative(frames), 0.95))
    # Five minutes on, with no new frames and no new ends: all of it has left the window.
    for t in range(30, 340, 10):
        w.sample(float(t), _cumulative(frames), 2)
    assert w.figures(330.0) == Health()
    # Fewer than MIN_FRAMES frames: no p95 to compare.
    w.sample(340.0, _cumulative(frames + [0.3] * 10), 2)
    assert w.figures(340.0).frames == 10 and w.figures(340.0).p95_ms is None
    with pytest.raises(ValueError):
        w.sample(341.0, (1, 2), 0)


def test_drills_add_to_the_window_and_clear() -> None:
    w = HealthWindow(BOUNDS)
    w.sample(0.0, _cumulative([0.002] * 1000), 0)
    w.sample(1.0, _cumulative([0.002] * 2000), 0)
    assert w.figures(1.0).frames == 1000 and w.figures(1.0).p95_ms is not None
    w.drill(1.0, Health(ended=10, errors=1, underruns=5, gpu_memory_errors=1, frames=500),
            latency_s=0.3)
    f = w.figures(1.0)
    assert (f.ended, f.errors, f.underruns, f.gpu_memory_errors, f.frames) == (10, 1, 5, 1, 1500)
    assert f.p95_ms is not None and f.p95_ms > 200.0  # a third of the frames 300 ms late
    with pytest.raises(ValueError):
        w.drill(1.0, Health(frames=5))  # frames need a latency
    w.clear_drills()
    assert w.figures(1.0).ended == 0 and w.figures(1.0).frames == 1000


def test_quantile_interpolates_within_its_bucket_as_prometheus_does() -> None:
    bounds = (0.01, 0.02, math.inf)
    assert quantile(bounds, (0, 100, 100), 0.5) == pytest.approx(0.015)
    assert quantile(bounds, (50, 100, 100), 0.25) == pytest.approx(0.005)
    assert quantile(bounds, (0, 0, 10), 0.95) == 0.02  # past the last bound: the bound
    assert quantile(bounds, (0, 0, 0), 0.95) == 0.0


def test_health_tags_read_back_coarse_and_refuse_garbage() -> None:
    h = Health(ended=120, errors=2, underruns=1234, gpu_memory_errors=0, p95_ms=133.4,
               frames=7549)
    assert health.encode(h) == "120,2,1234,0,130,7500"
    assert health.decode(health.encode(h)) == Health(120, 2, 1234, 0, 130.0, 7500)
    assert health.decode(health.encode(Health())) == Health()
    assert [two_figures(x) for x in (0, 3.4, 99.6, 133.4, 7549, 1_234_567)] == \
        [0, 3, 100, 130, 7500, 1_200_000]
    for bad in ("", "1,2,3", "1,2,3,4,5,6,7", "a,0,0,0,,0", "1,2,0,0,,0", "-1,0,0,0,,0",
                "1,0,0,0,x,0", "9" * 81):
        with pytest.raises(ValueError):
            health.decode(bad)


# -- the rollback rule ---------------------------------------------------------------------

OLD = [Health(ended=50, p95_ms=10.0, frames=9000), Health(ended=40, p95_ms=14.0, frames=9000)]


@pytest.mark.parametrize(("new", "fires"), [
    ([Health(ended=100, errors=1, p95_ms=12.0, frames=9000)], None),  # 1 %: not above
    ([Health(ended=100, errors=2, p95_ms=12.0, frames=9000)], "error rate"),
    ([Health(ended=50, errors=1), Health(ended=60)], None),  # 0.9 % over both nodes
    ([Health(ended=10, underruns=100)], None),  # 10 per session: not above
    ([Health(ended=10, underruns=101)], "underruns per ended session"),
    ([Health(gpu_memory_errors=1)], "GPU memory"),
    ([Health(p95_ms=30.0, frames=9000)], None),  # old 12 ms -> floor 20 -> up to 30 ms
    ([Health(p95_ms=31.0, frames=9000)], "p95 frame latency"),
    ([Health(p95_ms=200.0, frames=100)], None),  # frames too few: no p95 (None below)
    ([Health()], None),
])
def test_each_trigger_fires_alone_and_not_below_its_bound(new: list[Health],
                                                          fires: str | None) -> None:
    new = [h if h.frames >= 250 else Health(h.ended, h.errors, h.underruns,
                                             h.gpu_memory_errors, None, h.frames)
           for h in new]
    reason = rollback_reason(new, OLD)
    if fires is None:
        assert reason is None
    else:
        assert reason is not None and fires in reason


def test_latency_is_compared_with_the_old_version_above_the_floor() -> None:
    slow_old = [Health(p95_ms=60.0, frames=5000)]
    assert rollback_reason([Health(p95_ms=85.0, frames=5000)], slow_old) is None
    assert rollback_reason([Health(p95_ms=95.0, frames=5000)], slow_old) is not None
    # Weighted by frames: one bad node among busy good ones moves the mean a little.
    new = [Health(p95_ms=100.0, frames=1000), Health(p95_ms=5.0, frames=9000)]
    assert rollback_reason(new, slow_old) is None
    # No old figures (no old node served): nothing to compare with.
    assert rollback_reason([Health(p95_ms=500.0, frames=5000)], []) is None


# -- scale signals -------------------------------------------------------------------------


def _node(streams: int, cpu: float, gpu: float | None = None, status: str = "alive",
          capacity: int = 100) -> NodeFigures:
    return NodeFigures(status=status, capacity=capacity, streams=streams, cpu=cpu,
                       memory=0.5, gpu_memory=gpu)


@pytest.mark.parametrize(("nodes", "members", "recommended"), [
    ([_node(0, 0.0)], {"alive": 1}, 1),  # never below one
    ([_node(80, 0.1), _node(80, 0.1)], {"alive": 2}, 2),  # 160 / 80 = 2
    ([_node(81, 0.1), _node(80, 0.1)], {"alive": 2}, 3),  # 161 / 80 > 2
    ([_node(10, 0.9), _node(10, 0.9)], {"alive": 2}, 3),  # 1.8 / 0.7 = 2.6
    ([_node(10, 0.1, 0.95), _node(10, 0.1, 0.9)], {"alive": 2}, 3),  # 1.85 / 0.8 = 2.3
    ([_node(60, 0.5), _node(99, 5.0, status="failed")], {"alive": 1, "failed": 1}, 1),
])
def test_recommended_nodes_follow_the_busiest_resource(
        nodes: list[NodeFigures], members: dict[str, int], recommended: int) -> None:
    s = scale_signals(nodes)
    assert s.members == members and s.recommended_nodes == recommended
    alive = [n for n in nodes if n.status == "alive"]
    assert s.streams == sum(n.streams for n in alive)
    assert s.capacity == sum(n.capacity for n in alive)
    assert s.cpu == pytest.approx(sum(n.cpu for n in alive))


# -- tags ------------------------------------------------------------------------------------


def test_every_figure_fits_the_tags_with_the_rest() -> None:
    longest = NodeTags(node_id="n" * 64, url="https://" + "h" * 86 + ":65535", region="r" * 64,
                       location=(-89.1234, -179.1234), version="v" * 32, capacity=9_999_999,
                       free_slots=9_999_999, load=9.95, draining=True, streams=9_999_999,
                       memory=0.95, gpu_memory=0.95,
                       health=Health(999_999_999, 999_999_999, 999_999_999, 999_999_999,
                                     999_999.0, 999_999_999),
                       rollout_epoch=999_999_999_999)
    tags = encode(longest)
    assert encoded_size(tags) <= TAG_LIMIT, encoded_size(tags)
    peer = decode("n" * 64, "alive", tags)
    assert peer.streams == 9_999_999 and peer.rollout_epoch == 999_999_999_999
    assert peer.memory == 0.95 and peer.gpu_memory == 0.95
    assert peer.health.ended == 999_999_999


def test_a_member_of_an_older_version_without_the_figures_reads_as_none() -> None:
    tags = encode(NodeTags(node_id="a1", url="http://10.0.0.1:8080", region="eu",
                           location=None, version="1.0.0", capacity=8, free_slots=8, load=0.1))
    old = {k: v for k, v in tags.items() if k not in ("st", "mem", "gm", "hl", "ro")}
    peer = decode("a1", "alive", old)
    assert (peer.streams, peer.memory, peer.gpu_memory, peer.health, peer.rollout_epoch) == \
        (0, None, None, Health(), 0)
    for key, value in (("hl", "1,2"), ("hl", "1,5,0,0,,0"), ("ro", "-1"), ("mem", "1.5"),
                       ("gm", "nan"), ("st", "x")):
        with pytest.raises(TagError, match=key):
            decode("a1", "alive", {**tags, key: value})
