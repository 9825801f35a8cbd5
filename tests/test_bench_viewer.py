"""The bench's WHEP viewer: when speech is heard (rapido.bench.viewer), judged on known
arrivals; the whole path (a real node, real aiortc viewers) is in test_bench.py."""

from __future__ import annotations

import numpy as np

from rapido.bench.viewer import AUDIBLE, Heard, first_audible, viewer_onsets


def test_first_audible_finds_the_first_loud_sample_in_any_channel() -> None:
    mono = np.zeros(960, dtype=np.int16)
    assert first_audible(mono) is None
    mono[300] = AUDIBLE  # at the threshold is not above it
    mono[301] = -AUDIBLE - 1
    assert first_audible(mono) == 301
    stereo = np.zeros((960, 2), dtype=np.int16)
    stereo[500, 1] = 20_000
    stereo[700, 0] = 20_000
    assert first_audible(stereo) == 500
    # int16's most negative value has no positive twin: no overflow into silence.
    assert first_audible(np.array([0, -32768], dtype=np.int16)) == 1


def _heard(t0: float, frames: int, loud_from: int | None, offset_s: float = 0.0
           ) -> list[Heard]:
    """20 ms frames from ``t0``; frame ``loud_from`` on are audible, the first of them
    ``offset_s`` into the frame."""
    out = []
    for i in range(frames):
        loud = loud_from is not None and i >= loud_from
        out.append(Heard(t0 + 0.02 * i, (offset_s if i == loud_from else 0.0)
                         if loud else None))
    return out


def test_onset_is_when_the_chunk_start_is_heard_after_it_left() -> None:
    # Sent at 1.00 s, its first audible sample 5 ms into the chunk; the viewer's frame
    # from 1.12 s holds it 15 ms in: the chunk's start was heard at 1.13 s.
    heard = _heard(0.0, 50, None) + _heard(1.00, 10, 6, offset_s=0.015)
    got, missed = viewer_onsets([(1.0, 0.005)], heard, until=10.0)
    assert missed == 0
    assert np.allclose(got, [0.12 + 0.015 - 0.005])


def test_each_utterance_is_matched_with_what_was_heard_after_it() -> None:
    # Two utterances: the first heard 150 ms after it left; the second never heard
    # before a third was sent (missed), the third heard 90 ms after.
    heard = (_heard(0.0, 10, None) + _heard(0.2, 100, 5)  # loud from 0.30 s
             + _heard(2.2, 100, None)  # silence, the second was lost
             + _heard(4.2, 20, None) + _heard(4.6, 50, 0))  # loud from 4.60 s
    sent = [(0.15, 0.0), (2.0, 0.0), (4.51, 0.0)]
    got, missed = viewer_onsets(sent, heard, until=10.0)
    assert missed == 1
    assert np.allclose(got, [0.15, 0.09])


def test_audio_heard_before_the_send_is_not_this_utterance() -> None:
    # Loud already (an earlier utterance's end) when it is sent: this one is heard where
    # sound begins again after silence, not at the next frame of the earlier one.
    heard = _heard(0.0, 10, 0) + _heard(0.2, 10, None) + _heard(0.4, 10, 0)
    got, missed = viewer_onsets([(0.1, 0.0)], heard, until=10.0)
    assert (missed, list(np.round(got, 3))) == (0, [0.3])


def test_utterances_sent_after_until_are_not_judged() -> None:
    heard = _heard(0.0, 10, None)
    got, missed = viewer_onsets([(0.1, 0.0), (5.0, 0.0)], heard, until=1.0)
    assert (got, missed) == ([], 1)  # the first judged and never heard; the second not


def test_by_arrival_places_frames_where_their_packets_arrived() -> None:
    # aiortc's audio jitter buffer holds each frame until four more have arrived: the
    # same frames, decoded 80 ms after their packets came, read 80 ms earlier by arrival.
    heard = [Heard(h.at, h.audible_s, h.at - 0.08)
             for h in _heard(0.0, 20, None) + _heard(0.4, 20, 2, offset_s=0.01)]
    sent = [(0.3, 0.0)]
    decoded, _ = viewer_onsets(sent, heard, until=10.0)
    arrived, missed = viewer_onsets(sent, heard, until=10.0, by_arrival=True)
    assert missed == 0 and np.allclose(decoded, [0.15]) and np.allclose(arrived, [0.07])
    # A frame whose packet was not seen is left out, not placed at time 0.
    blind = [Heard(h.at, h.audible_s, None) for h in heard]
    assert viewer_onsets(sent, blind, until=10.0, by_arrival=True) == ([], 1)
