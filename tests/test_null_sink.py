from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rapido.livekit.sink import LiveKitSink
from rapido.pipeline.media import AUDIO_RATE, MediaChunk, VideoFrame, frame_samples
from rapido.pipeline.sinks.base import Adaptive, Sink, SinkStats
from rapido.pipeline.sinks.null import NullSink
from rapido.pipeline.sinks.recorder import RecorderSink
from rapido.webrtc import WebRtcSink

FPS = 25
SPF = frame_samples(FPS)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _chunk(index: int, *, speaking: bool = False) -> MediaChunk:
    picture = np.zeros((6, 4), dtype=np.uint8)
    picture.flags.writeable = False
    return MediaChunk(
        index=index,
        video=VideoFrame(picture, 4, 4),
        audio=np.zeros(SPF, dtype=np.int16),
        speaking=speaking,
    )


def test_is_a_sink() -> None:
    sink = NullSink()
    assert isinstance(sink, Sink)
    assert sink.kind == "null"



def test_only_the_publishers_adapt(tmp_path: Path) -> None:
    """The engine's load samples and quality score go to the sinks that publish."""
    # Typed, so mypy checks the signatures too.
    publishers: list[Adaptive] = [WebRtcSink(width=64, height=48, fps=FPS), LiveKitSink(url=None)]
    others = [NullSink(), RecorderSink(tmp_path / "r.mp4", width=64, height=48, fps=FPS)]
    for sink in (*publishers, *others):
        assert isinstance(sink, Sink)
    assert all(isinstance(sink, Adaptive) for sink in publishers)
    assert not any(isinstance(sink, Adaptive) for sink in others)

async def test_counts_frames_audio_speaking_and_interrupts() -> None:
    sink = NullSink()
    await sink.start()
    for i in range(30):
        sink.write(_chunk(i, speaking=i % 3 == 0))
    sink.interrupt()
    sink.interrupt()

    stats = sink.stats().json()
    assert stats["frames"] == 30
    assert stats["audio_samples"] == 30 * SPF == 30 * AUDIO_RATE // FPS
    assert stats["speaking_frames"] == 10
    assert stats["interrupts"] == 2
    assert sink.playout_frames == 30
    await sink.aclose()
    await sink.aclose()
    assert sink.closed


def test_fps_is_exact_for_a_steady_stream_and_decays_when_it_stalls() -> None:
    clock = FakeClock()
    sink = NullSink(clock=clock)
    assert sink.stats().json()["fps"] == 0.0

    start = clock.now
    for i in range(100):  # 4 s at 25 fps: the 2 s window has long been full
        clock.now = start + i / FPS
        sink.write(_chunk(i))
    assert sink.stats().json()["fps"] == pytest.approx(25.0, rel=1e-6)

    # Only the last ~2 s count: a slower second half shows up as the recent rate.
    for i in range(100, 150):
        clock.now = start + 99 / FPS + (i - 99) / 10
        sink.write(_chunk(i))
    assert sink.stats().json()["fps"] == pytest.approx(10.0, rel=1e-6)

    clock.now += 1.0  # a stall: fewer frames, and the idle time counts
    stalled = sink.stats().json()["fps"]
    assert 0.0 < stalled < 10.0

    clock.now += 2.0  # nothing in the window any more
    assert sink.stats().json()["fps"] == 0.0
    assert sink.stats().json()["frames"] == 150


def test_rejects_a_non_positive_window() -> None:
    with pytest.raises(ValueError):
        NullSink(fps_window_s=0)


def test_sink_stats_keep_each_kinds_json_keys(tmp_path: Path) -> None:
    """``SinkStats.json()`` is ``stats.sink`` on the wire: each kind keeps its own keys,
    in order, and the typed common fields agree with them."""
    webrtc = WebRtcSink(width=64, height=48, fps=FPS)
    sinks: dict[str, tuple[Sink, list[str]]] = {
        "null": (NullSink(), ["kind", "frames", "audio_samples", "fps", "speaking_frames",
                              "interrupts"]),
        "record": (RecorderSink(tmp_path / "r.mp4", width=64, height=48, fps=FPS),
                   ["kind", "path", "frames_written", "audio_samples_written",
                    "dropped_frames", "discarded_frames", "out_of_order_frames",
                    "queue_depth", "bytes", "interrupts", "error"]),
        "webrtc": (webrtc,
                   ["kind", "viewers", "viewers_total", "viewers_joining", "connect_timeouts",
                    "encoders", "encoders_created",
                    "consumers", "frames_in", "frames_encoded", "video_frames_encoded",
                    "dropped_frames", "queue_depth", "interrupts", "quality", "receivers",
                    "error"]),
        "livekit": (LiveKitSink(url=None),
                    ["kind", "state", "reason", "url", "retries", "connects",
                     "last_connect_s", "frames_captured", "audio_frames_captured",
                     "frames_unpublished", "dropped_backlog", "discarded_frames",
                     "pending_frames", "video_waiting", "audio_queued_ms", "interrupts",
                     "video_codec", "frames_thinned", "quality", "link", "stats_errors"]),
    }
    for kind, (sink, keys) in sinks.items():
        stats = sink.stats()
        assert isinstance(stats, SinkStats)
        body = stats.json()
        assert list(body) == keys, kind
        assert stats.kind == body["kind"] == kind
        assert (stats.frames, stats.dropped, stats.interrupts) == (0, 0, 0)
        assert (stats.quality is not None) == isinstance(sink, Adaptive) == ("quality" in body)
        assert (stats.encoded is not None) == (kind in ("record", "webrtc"))
    quality = webrtc.stats().json()["quality"]
    assert quality == {"bitrate": 1_000_000, "fps": 25.0, "score": 1.0, "limited_by": None}
