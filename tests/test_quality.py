"""The adaptive quality controller: fed reports and load samples, read its state."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapido.pipeline.quality import (
    Backlog,
    NodeLoad,
    PublisherQuality,
    Quality,
    QualityBounds,
    QualityController,
    keep_frame,
    score,
)

B = QualityBounds(min_bitrate=150_000, max_bitrate=1_000_000, min_fps=12.5, max_fps=25)


def feed_reports(q: QualityController, receiver: str, loss: float, t0: float, n: int,
                 every_s: float = 1.0) -> float:
    t = t0
    for _ in range(n):
        q.on_receiver_report(receiver, loss, t)
        q.update(t)
        t += every_s
    return t


def feed_load(q: QualityController, load: float, t0: float, seconds: float,
              every_s: float = 0.5) -> float:
    t = t0
    while t < t0 + seconds:
        q.on_load(load, t)
        q.update(t)
        t += every_s
    return t


def test_starts_at_full_quality() -> None:
    q = QualityController(B)
    got = q.update(0.0)
    assert got == Quality(1_000_000, Fraction(25), 1.0, None)


def test_heavy_loss_cuts_bitrate_and_lossless_recovers_it() -> None:
    q = QualityController(B)
    t = feed_reports(q, "v1", 0.3, 0.0, 10)
    low = q.quality()
    assert low.bitrate < 500_000
    assert low.limited_by == "bandwidth"
    assert low.score < 1.0
    assert low.fps == 25
    # Loss-free reports grow it back by 8 % per report up to the ceiling.
    feed_reports(q, "v1", 0.0, t, 40)
    assert q.quality().bitrate == 1_000_000
    assert q.quality().score == 1.0


def test_moderate_loss_holds() -> None:
    q = QualityController(B)
    t = feed_reports(q, "v1", 0.3, 0.0, 4)
    held = q.target_bitrate(t)
    feed_reports(q, "v1", 0.05, t, 10)
    assert q.target_bitrate(t + 10) == held


def test_bitrate_never_leaves_bounds() -> None:
    q = QualityController(B)
    feed_reports(q, "v1", 1.0, 0.0, 50)
    assert q.quality().bitrate == B.min_bitrate
    assert q.quality().score == pytest.approx(0.5)


def test_remb_caps_the_estimate_until_stale() -> None:
    q = QualityController(B)
    q.on_remb("v1", 400_000, 0.0)
    assert q.target_bitrate(0.0) == 400_000
    assert q.target_bitrate(q.stale_after_s + 1) == B.max_bitrate


def test_shared_encoder_follows_the_worst_of_few_viewers() -> None:
    q = QualityController(B)
    for t in range(10):
        q.on_receiver_report("good", 0.0, t)
        q.on_receiver_report("bad", 0.4, t)
    assert q.target_bitrate(9) == B.min_bitrate
    q.forget("bad")
    assert q.target_bitrate(9) == B.max_bitrate


def test_one_bad_viewer_among_many_does_not_drag_everyone_down() -> None:
    q = QualityController(B)
    for t in range(10):
        for i in range(9):
            q.on_receiver_report(f"good{i}", 0.0, t)
        q.on_receiver_report("bad", 0.4, t)
    assert q.target_bitrate(9) == B.max_bitrate


def test_silent_viewers_stop_counting() -> None:
    q = QualityController(B)
    feed_reports(q, "gone", 0.5, 0.0, 10)
    assert q.target_bitrate(9) == B.min_bitrate
    assert q.target_bitrate(9 + q.stale_after_s + 1) == B.max_bitrate


def test_changes_are_rate_limited_and_need_a_real_move() -> None:
    q = QualityController(B, min_interval_s=2.0)
    q.update(0.0)
    q.on_receiver_report("v1", 0.5, 0.1)  # estimate -> 750 k
    assert q.update(0.5).bitrate == 1_000_000  # too soon
    assert q.update(2.0).bitrate == 750_000
    assert q.changes == 1
    q.on_receiver_report("v1", 0.0, 2.1)  # +8 %: under min_change
    assert q.update(5.0).bitrate == 750_000
    assert q.changes == 1


def test_overload_steps_frame_rate_down_quickly_and_up_slowly() -> None:
    q = QualityController(B)
    t = feed_load(q, 1.2, 0.0, 1.6)
    assert q.quality().fps == 20
    assert q.quality().limited_by == "cpu"
    t = feed_load(q, 1.2, t, 10.0)
    assert q.quality().fps == Fraction(25, 2)  # the floor, not below
    assert q.quality().score == pytest.approx(0.5)
    # Back under low_load: one rung per up_after_s.
    t = feed_load(q, 0.3, t, 5.6)
    assert q.quality().fps == 15
    t = feed_load(q, 0.3, t, 20.0)
    assert q.quality().fps == 25
    assert q.quality().limited_by is None


def test_steps_up_only_while_the_projected_load_fits() -> None:
    q = QualityController(B)
    t = feed_load(q, 1.2, 0.0, 10.0)
    assert q.quality().fps == Fraction(25, 2)
    # 0.7 at 12.5 fps projects to 0.84 at 15: up; at 15 it projects to 0.93: hold.
    t = feed_load(q, 0.7, t, 30.0)
    assert q.quality().fps == 15
    # A lighter node (0.6: 0.8 at 20, 0.75 at 25) climbs all the way.
    feed_load(q, 0.6, t, 30.0)
    assert q.quality().fps == 25


def test_load_between_thresholds_holds_the_rate() -> None:
    q = QualityController(B)
    t = feed_load(q, 1.0, 0.0, 1.6)
    assert q.quality().fps == 20
    feed_load(q, 0.7, t, 30.0)
    assert q.quality().fps == 20


def test_a_limit_between_rungs_settles_instead_of_oscillating() -> None:
    """A node that holds 15 fps but not 20: each probe up to 20 fails and doubles
    the wait before the next, so over 10 minutes it mostly sits at 15."""
    q = QualityController(B)
    t, changes, at_15 = 0.0, 0, 0
    last = q.quality().fps
    while t < 600:
        fps = q.quality().fps
        q.on_load(1.2 if fps > 15 else 0.4, t)
        q.update(t)
        changes += q.quality().fps != last
        last = q.quality().fps
        at_15 += last == 15
        t += 0.5
    assert changes <= 30
    assert at_15 / 1200 > 0.85
    # Without the backoff it would probe every 5 s: ~100 changes.
    naive = QualityController(B, max_up_wait_s=5.0)
    t, naive_changes, last = 0.0, 0, naive.quality().fps
    while t < 600:
        naive.on_load(1.2 if naive.quality().fps > 15 else 0.4, t)
        naive.update(t)
        naive_changes += naive.quality().fps != last
        last = naive.quality().fps
        t += 0.5
    assert naive_changes > 3 * changes, (naive_changes, changes)


def test_brief_spikes_do_not_degrade() -> None:
    q = QualityController(B)
    t = 0.0
    for _ in range(20):
        q.on_load(1.5, t)
        q.on_load(0.5, t + 0.5)
        q.update(t + 0.5)
        t += 1.0
    assert q.quality().fps == 25


def test_ladder_respects_the_configured_floor() -> None:
    assert QualityBounds(1, 2, 20, 25).ladder() == [25, 20]
    assert QualityBounds(1, 2, 18, 25).ladder() == [25, 20, 18]
    assert QualityBounds(1, 2, 25, 25).ladder() == [25]
    assert QualityBounds(1, 2, 12.5, 25).ladder() == [25, 20, 15, Fraction(25, 2)]


@pytest.mark.parametrize("kwargs", [
    {"min_bitrate": 0, "max_bitrate": 10, "min_fps": 1, "max_fps": 2},
    {"min_bitrate": 20, "max_bitrate": 10, "min_fps": 1, "max_fps": 2},
    {"min_bitrate": 1, "max_bitrate": 10, "min_fps": 3, "max_fps": 2},
    {"min_bitrate": 1, "max_bitrate": 10, "min_fps": 0, "max_fps": 2},
])
def test_bad_bounds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        QualityBounds(**kwargs)  # type: ignore[arg-type]


def test_bad_feedback_is_refused_and_changes_nothing() -> None:
    q = QualityController(B)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            q.on_receiver_report("v1", bad, 0.0)
    with pytest.raises(ValueError):
        q.on_remb("v1", -5, 0.0)
    with pytest.raises(ValueError):
        q.on_load(float("nan"), 0.0)
    assert q.receivers() == {}
    assert q.update(1.0).score == 1.0


def test_backlog_counts_drops_as_load_and_stutter() -> None:
    b = Backlog()
    assert b.sample(fill=0.2, dropped=0, offered=25) == 0.2
    assert b.delivered == 1.0
    # Half of the next second's chunks dropped: overloaded, and the share falls.
    assert b.sample(fill=0.9, dropped=25, offered=75) == 1.5
    assert b.delivered == pytest.approx(0.85)
    # Clean seconds bring it back, a third of the way per sample.
    for n in range(2, 12):
        assert b.sample(fill=0.1, dropped=25, offered=75 + 25 * n) == 0.1
    assert b.delivered > 0.99
    assert b.sample(fill=0.0, dropped=25, offered=75 + 25 * 11) == 0.0  # nothing offered


def test_publisher_quality_takes_the_worse_of_node_and_own_load() -> None:
    """What both publishing sinks run: the node's load or their own backlog, whichever
    is worse, steps the target down; drops lower the score, not the controller's."""
    p = PublisherQuality(B, 0.0)
    assert (p.target.bitrate, p.target.fps) == (1_000_000, 25)
    assert p.bounds is B and p.score() == 1.0
    # A quiet node, but this publisher dropped half of what it was offered.
    p.adapt(0.1, 0.0, fill=0.0, dropped=0, offered=25)
    p.adapt(0.1, 1.0, fill=1.0, dropped=25, offered=75)
    assert p.target.fps == 25  # one period over the limit is not enough
    p.adapt(0.1, 2.0, fill=1.0, dropped=50, offered=125)
    assert p.target.fps == 20 and p.quality().limited_by == "cpu"
    assert p.score() == pytest.approx(p.quality().score * p.backlog.delivered)
    assert p.score() < p.quality().score
    # The frame rate decides which frames are kept: four in five at 20 of 25.
    assert sum(p.keep(i, 25) for i in range(25)) == 20
    # Inputs fed to the controller directly reach the target on retarget.
    p.controller.on_remb("viewer", 150_000, 10.0)
    assert p.target.bitrate == 1_000_000
    assert p.retarget(10.0).bitrate == 150_000 and p.target.bitrate == 150_000


def test_score_is_monotonic_in_both() -> None:
    assert score(1_000_000, 25, B) == 1.0
    assert score(150_000, 25, B) == pytest.approx(0.5)
    assert score(1_000_000, 12.5, B) == pytest.approx(0.5)
    assert score(400_000, 25, B) < score(600_000, 25, B) < 1.0
    assert score(1_000_000, 15, B) < score(1_000_000, 20, B)


@pytest.mark.parametrize(("fps", "kept"), [
    (Fraction(25), 50), (Fraction(20), 40), (Fraction(15), 30),
    (Fraction(25, 2), 25), (Fraction(5), 10),
])
def test_keep_frame_spaces_frames_evenly(fps: Fraction, kept: int) -> None:
    picks = [i for i in range(50) if keep_frame(i, fps, 25)]
    assert len(picks) == kept
    gaps = {b - a for a, b in itertools.pairwise(picks)}
    assert max(gaps) - min(gaps) <= 1


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                          st.floats(0, 1), st.floats(0, 3)), max_size=200))
def test_any_feedback_stays_within_bounds(events: list[tuple[str, float, float]]) -> None:
    q = QualityController(B)
    t = 0.0
    for who, loss, load in events:
        q.on_receiver_report(who, loss, t)
        q.on_load(load, t)
        got = q.update(t)
        assert B.min_bitrate <= got.bitrate <= B.max_bitrate
        assert B.min_fps <= got.fps <= B.max_fps
        assert 0.0 < got.score <= 1.0
        t += 0.3


def test_node_load_is_the_cpu_share_or_late_frames() -> None:
    load = NodeLoad(cores=2, wall=0.0, cpu=0.0)
    for _ in range(100):
        load.frame(late=False)
    assert load.sample(wall=1.0, cpu=1.0) == pytest.approx(0.5)  # one of two cores
    for k in range(100):
        load.frame(late=k < 5)  # 5 % late: a node at its limit whatever the CPU says
    assert load.sample(wall=2.0, cpu=1.2) == pytest.approx(1.0)
    load.frame(late=True)  # all late, and no clock moved: clamped, and no division by 0
    assert load.sample(wall=2.0, cpu=1.2) == 2.0
    assert load.sample(wall=3.0, cpu=1.2) == 0.0  # idle: no frames, no CPU
    with pytest.raises(ValueError, match="cores"):
        NodeLoad(cores=0, wall=0.0, cpu=0.0)
