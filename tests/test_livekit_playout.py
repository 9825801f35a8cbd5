"""AudioPlayout: when audio handed to the native source is sent, fed by hand."""

from __future__ import annotations

import pytest

from rapido.livekit.playout import AudioPlayout


def test_audio_queues_behind_what_is_already_there() -> None:
    p = AudioPlayout()
    assert p.capture(10.0, 0.04) == 10.0
    assert p.capture(10.01, 0.04) == pytest.approx(10.04)  # 30 ms still queued before it
    assert p.queued(10.01) == pytest.approx(0.07)
    assert p.queued(10.08) == 0.0


def test_a_queue_that_ran_dry_starts_the_next_audio_at_once() -> None:
    """The SDK's ``queued_duration`` goes below empty here (0.04 - 0.5) and then reports
    nothing queued while 40 ms are: the picture of that audio would lead it."""
    p = AudioPlayout()
    p.capture(10.0, 0.04)
    assert p.capture(10.5, 0.04) == 10.5  # stalled: the queue ran dry at 10.04
    assert p.capture(10.5, 0.04) == pytest.approx(10.54)  # the catch-up queues behind it
    assert p.queued(10.5) == pytest.approx(0.08)


def test_clear_empties_the_queue() -> None:
    p = AudioPlayout()
    p.capture(10.0, 0.1)
    p.clear(10.02)
    assert p.queued(10.02) == 0.0
    assert p.capture(10.03, 0.04) == 10.03


def test_a_capture_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        AudioPlayout().capture(1.0, 0.0)


def test_clear_tells_the_speech_never_heard() -> None:
    p = AudioPlayout()
    p.capture(10.0, 0.04)  # silence, then three frames of speech behind it
    for _ in range(3):
        p.capture(10.0, 0.04, speaking=True)
    # At 10.06: the silence and half the first speech frame have played.
    assert p.clear(10.06) == pytest.approx(0.10)
    assert p.clear(10.07) == 0.0  # nothing left after a clear
    p.capture(11.0, 0.04, speaking=True)
    assert p.clear(11.05) == 0.0  # all of it played
