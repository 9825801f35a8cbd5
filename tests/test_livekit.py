"""LiveKit pieces without a server: tokens, the sink's sources and reconnects, and the
agents avatar protocol at the message level."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import socket
import time
from typing import Any, cast

import jwt
import numpy as np
import pytest
from livekit import rtc
from livekit.rtc._proto import stats_pb2

from rapido.livekit import agents
from rapido.livekit.limits import validate_queue_size_ms
from rapido.livekit.linkstats import VideoLink, video_link
from rapido.livekit.sink import LiveKitSink, backoff_delay
from rapido.livekit.tokens import (
    PUBLISH_ON_BEHALF,
    publisher_identity,
    publisher_token,
    room_name,
    viewer_token,
)
from rapido.pipeline.media import MediaChunk, VideoFrame

KEY, SECRET = "devkey", "s" * 32
W, H = 854, 480


def _decode(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, SECRET, algorithms=["HS256"])
    return claims


# -- tokens ------------------------------------------------------------------------------

def test_room_name_and_identity() -> None:
    assert room_name("abc_1") == "lesson_abc_1"
    with pytest.raises(ValueError):
        room_name("bad id")
    assert publisher_identity("n1", "s9") == "rapido-n1-s9"


def test_publisher_token_grants() -> None:
    t0 = time.time()
    c = _decode(publisher_token(KEY, SECRET, room="lesson_x", identity="rapido-n-s",
                                name="Tutor", ttl_s=600))
    assert c["sub"] == "rapido-n-s" and c["iss"] == KEY and c["name"] == "Tutor"
    v = c["video"]
    assert v["roomJoin"] is True and v["room"] == "lesson_x"
    assert v["canPublish"] is True and v["canSubscribe"] is False
    assert v["canPublishData"] is False
    assert abs(c["exp"] - (t0 + 600)) < 5
    assert "attributes" not in c and c.get("kind") in (None, "", "standard")


def test_publisher_token_agent_avatar() -> None:
    c = _decode(publisher_token(KEY, SECRET, room="r", identity="rapido-n-s", ttl_s=60,
                                agent_identity="agent-7"))
    assert c["kind"] == "agent"
    assert c["attributes"] == {PUBLISH_ON_BEHALF: "agent-7"}
    assert c["video"]["canPublishData"] is True and c["video"]["canSubscribe"] is False


def test_viewer_token() -> None:
    t0 = time.time()
    c = _decode(viewer_token(KEY, SECRET, room="lesson_y", identity="viewer-1", ttl_s=120))
    v = c["video"]
    assert v["room"] == "lesson_y" and v["roomJoin"] is True
    assert v["canSubscribe"] is True and v["canPublish"] is False
    assert v["canPublishData"] is False
    assert abs(c["exp"] - (t0 + 120)) < 5 and c["sub"] == "viewer-1"
    assert v["hidden"] is True  # viewers do not show up as participants of the lesson
    # Without an identity each minting gets its own: two viewers never collide.
    a, b = (_decode(viewer_token(KEY, SECRET, room="lesson_y"))["sub"] for _ in range(2))
    assert a != b and a.startswith("viewer-") and b.startswith("viewer-")


def test_token_errors() -> None:
    with pytest.raises(ValueError):
        publisher_token("", SECRET, room="r", identity="i", ttl_s=1)
    with pytest.raises(ValueError):
        viewer_token(KEY, SECRET, room="r", identity="i", ttl_s=0)
    with pytest.raises(ValueError):
        publisher_token(KEY, SECRET, room="", identity="i", ttl_s=1)


# -- sink ---------------------------------------------------------------------------------

def _chunk(i: int, value: int = 100) -> MediaChunk:
    data = np.full((H * 3 // 2, W), i % 256, dtype=np.uint8)
    audio = np.full(1920, value, dtype=np.int16)
    return MediaChunk(i, VideoFrame(data, W, H), audio, True)


@pytest.mark.parametrize("bad", [0, -10, 15, 105, 1.5])
def test_queue_size_validated(bad: Any) -> None:
    # Must be caught here: the native side aborts the process on these.
    with pytest.raises(ValueError):
        validate_queue_size_ms(bad)
    with pytest.raises(ValueError):
        LiveKitSink(url=None, queue_size_ms=bad)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        LiveKitSink(url=None, audio_rate=44000)
    with pytest.raises(ValueError):
        LiveKitSink(url=None, num_channels=2)
    with pytest.raises(ValueError):
        LiveKitSink(url=None, video_codec="theora")
    with pytest.raises(ValueError):
        LiveKitSink(url="ws://x")  # no token factory


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, initial_s=0.5, max_s=4.0, jitter=0.25, rng=rng)
              for n in range(1, 10)]
    assert 0.375 <= delays[0] <= 0.5
    assert all(d <= 4.0 for d in delays) and delays[-1] >= 3.0
    assert backoff_delay(100, initial_s=1, max_s=2, jitter=0, rng=rng) == 2.0


async def test_write_validates_chunks() -> None:
    sink = LiveKitSink(url=None)
    await sink.start()
    try:
        bad_audio = MediaChunk(0, _chunk(0).video, np.zeros(1000, np.int16), False)
        with pytest.raises(ValueError):
            sink.write(bad_audio)
        small = VideoFrame(np.zeros((240 * 3 // 2, 426), np.uint8), 426, 240)
        with pytest.raises(ValueError):
            sink.write(MediaChunk(0, small, np.zeros(1920, np.int16), False))
    finally:
        await sink.aclose()


async def test_sources_pace_at_real_time() -> None:
    sink = LiveKitSink(url=None, queue_size_ms=100, max_pending=100)
    await sink.start()
    try:
        t0 = time.monotonic()
        for i in range(40):  # 1.6 s of media, written at once
            sink.write(_chunk(i))
        for _ in range(400):
            if sink.audio_frames_captured >= 40:
                break
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        # The audio source lets the last frame in once the queue is down to 100 ms: not
        # sooner (1.5 s of the 1.6 s played), and not much later (a slow spell of the
        # machine may hold the test's loop; the native queue plays on its own thread).
        assert 1.2 <= elapsed <= 3.0, elapsed
        await asyncio.sleep(0.25)
        assert sink.frames_captured == 40 and sink.playout_frames == 40
        st = sink.stats().json()
        assert st["state"] == "idle" and st["dropped_backlog"] == 0
        assert st["frames_unpublished"] == 40
    finally:
        await sink.aclose()
    assert sink.state == "closed"


async def test_interrupt_flushes_queue_and_audio() -> None:
    sink = LiveKitSink(url=None, queue_size_ms=200, max_pending=100)
    await sink.start()
    try:
        t0 = time.monotonic()
        for i in range(50):
            sink.write(_chunk(i))
        await asyncio.sleep(0.15)
        assert sink.stats().json()["audio_queued_ms"] > 50
        # 2 s of speech went in; about 150 ms of it has played out of the native queue
        # (no more than the time that passed, which a slow spell may stretch).
        unheard = sink.interrupt()
        elapsed_ms = 1000 * (time.monotonic() - t0)
        assert 2000.0 - elapsed_ms - 60.0 <= unheard <= 1900.0, (unheard, elapsed_ms)
        st = sink.stats().json()
        assert st["pending_frames"] == 0 and st["video_waiting"] == 0
        assert st["audio_queued_ms"] == 0.0 and st["interrupts"] == 1
        captured = sink.audio_frames_captured
        await asyncio.sleep(0.2)
        assert sink.audio_frames_captured <= captured + 1  # at most the one in flight
        # The stream goes on after a barge-in.
        before = sink.audio_frames_captured
        sink.write(_chunk(50))
        await _until(lambda: sink.audio_frames_captured >= before + 1)
        # ... and plays out (what follows is about silence only).
        await _until(lambda: sink.stats().json()["audio_queued_ms"] == 0.0)
        # Silence dropped unplayed is no speech unheard.
        for i in range(51, 56):
            sink.write(dataclasses.replace(_chunk(i), speaking=False))
        assert sink.interrupt() == 0.0
    finally:
        await sink.aclose()


async def test_backlog_is_bounded() -> None:
    sink = LiveKitSink(url=None, max_pending=5)
    await sink.start()
    try:
        for i in range(30):
            sink.write(_chunk(i))
        assert sink.stats().json()["pending_frames"] <= 5
        assert sink.dropped_backlog >= 24
    finally:
        await sink.aclose()


async def test_node_load_thins_captured_pictures_never_audio() -> None:
    sink = LiveKitSink(url=None, queue_size_ms=100, max_pending=100, min_fps=12.5)
    await sink.start()
    try:
        t = 0.0
        for _ in range(8):  # 4 s over the limit: down the ladder to the floor
            sink.adapt(1.5, t)
            t += 0.5
        q = sink.stats().json()["quality"]
        assert (q["fps"], q["limited_by"]) == (12.5, "cpu") and q["score"] == 0.5
        for i in range(40):
            sink.write(_chunk(i))
        for _ in range(400):
            if sink.audio_frames_captured >= 40:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.25)
        assert sink.audio_frames_captured == 40
        assert (sink.frames_captured, sink.frames_thinned) == (20, 20)
        assert sink.playout_frames == 40
        # A quiet node climbs back up, one rung per 5 s of quiet.
        for _ in range(60):
            sink.adapt(0.1, t)
            t += 0.5
        assert sink.stats().json()["quality"]["fps"] == 25
    finally:
        await sink.aclose()


async def test_own_backlog_counts_as_load() -> None:
    sink = LiveKitSink(url=None, max_pending=5, min_fps=12.5)
    await sink.start()
    try:
        for i in range(30):
            sink.write(_chunk(i))
        assert sink.dropped_backlog > 0
        sink.adapt(0.0, 0.0)
        assert sink.quality_score() < 0.8  # most chunks dropped: stutter (smoothed)
        sink.write(_chunk(30))  # still dropping
        sink.adapt(0.0, 1.1)
        assert sink.stats().json()["quality"]["fps"] < 25
        # Without min_fps the frame rate is fixed, whatever the load.
        fixed = LiveKitSink(url=None)
        for t in range(10):
            fixed.adapt(2.0, float(t))
        assert fixed.stats().json()["quality"]["fps"] == 25
    finally:
        await sink.aclose()


def _outbound(kind: str = "video", *, target: float = 1_200_000.0, fps: float = 25.0,
              size: tuple[int, int] = (854, 480), active: bool = True,
              reason: stats_pb2.QualityLimitationReason.ValueType = stats_pb2.LIMITATION_NONE,
              ) -> stats_pb2.RtcStats:
    """An outbound-rtp entry as the SDK hands it over (every field filled)."""
    out = stats_pb2.OutboundRtpStreamStats(
        target_bitrate=target, frames_per_second=fps, frame_width=size[0],
        frame_height=size[1], quality_limitation_reason=reason, active=active)
    return stats_pb2.RtcStats(outbound_rtp=stats_pb2.RtcStats.OutboundRtp(
        stream=stats_pb2.RtpStreamStats(kind=kind), outbound=out))


BW = stats_pb2.LIMITATION_BANDWIDTH


def test_video_link_from_libwebrtc_stats() -> None:
    # Nothing published yet, or only audio: no video link to speak of.
    assert video_link([]) is None
    assert video_link([_outbound("audio", target=32_000)]) is None
    assert video_link([stats_pb2.RtcStats(
        transport=stats_pb2.RtcStats.Transport())]) is None
    one = video_link([_outbound("audio", target=32_000), _outbound(target=900_000)])
    assert one == VideoLink(target_bitrate=900_000, limitation=None, layers=1, fps=25.0,
                            width=854, height=480)
    # Simulcast: libwebrtc copies the stream's target and reason into every layer's
    # entry; read once, not summed. The top layer paused (0 fps): the largest layer
    # still sending gives size and rate.
    three = video_link([
        _outbound(target=400_000, size=(854, 480), fps=0.0, reason=BW),
        _outbound(target=400_000, size=(427, 240), fps=20.0, reason=BW),
        _outbound(target=400_000, size=(214, 120), fps=20.0, reason=BW),
    ])
    assert three == VideoLink(target_bitrate=400_000, limitation="bandwidth", layers=2,
                              fps=20.0, width=427, height=240)
    assert three.as_json()["size"] == "427x240"
    # The worst reason of any layer is the link's; `active` (the app's per-layer
    # switch, read as false when a build omits it) does not hide a layer.
    cpu = video_link([_outbound(reason=stats_pb2.LIMITATION_CPU), _outbound(active=False)])
    assert cpu is not None and (cpu.limitation, cpu.layers) == ("cpu", 2)
    both = video_link([_outbound(reason=stats_pb2.LIMITATION_CPU), _outbound(reason=BW)])
    assert both is not None and both.limitation == "bandwidth"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_video_link_skips_garbage_numbers(bad: float) -> None:
    assert video_link([_outbound(target=bad)]) is None
    assert video_link([_outbound(fps=bad)]) is None
    link = video_link([_outbound(target=bad), _outbound(target=500_000, size=(427, 240))])
    assert link is not None and (link.target_bitrate, link.layers) == (500_000, 1)


async def test_libwebrtc_estimate_reaches_the_score() -> None:
    sink = LiveKitSink(url=None, max_bitrate=1_500_000, min_bitrate=150_000)
    await sink.start()
    t0 = time.monotonic() + 2.0  # sample times after the controller's first decision
    try:
        assert sink.stats().json()["link"] is None
        sink.adapt(0.1, t0 + 0.0)
        assert sink.stats().json()["quality"] == {"bitrate": 1_500_000, "fps": 25.0, "score": 1.0,
                                           "limited_by": None}
        # A target under the ceiling with nothing limiting it (ramp-up after a connect,
        # easy content) is not a short link.
        sink.on_rtc_stats([_outbound(target=300_000)], now=t0 + 0.5)
        sink.adapt(0.1, t0 + 2.5)
        assert sink.stats().json()["quality"]["score"] == 1.0
        assert sink.stats().json()["link"]["target_bitrate"] == 300_000
        # libwebrtc says bandwidth holds the video at ~500 kbps: the score shows it, as
        # it would for a webrtc sink whose viewer reports loss.
        sink.on_rtc_stats([_outbound(target=474_342, reason=BW)], now=t0 + 3.0)
        sink.adapt(0.1, t0 + 5.0)
        q = sink.stats().json()["quality"]
        assert (q["bitrate"], q["fps"], q["limited_by"]) == (474_342, 25.0, "bandwidth")
        assert q["score"] == pytest.approx(0.75, abs=0.01)  # halfway up the log scale
        assert sink.stats().json()["link"]["limitation"] == "bandwidth"
        # An estimate under the floor counts as the floor.
        sink.on_rtc_stats([_outbound(target=40_000, reason=BW)], now=t0 + 7.0)
        sink.adapt(0.1, t0 + 7.5)
        assert sink.stats().json()["quality"]["bitrate"] == 150_000
        assert sink.stats().json()["quality"]["score"] == pytest.approx(0.5)
        # Stats with no video (e.g. between reconnects) change nothing ...
        sink.on_rtc_stats([_outbound("audio")], now=t0 + 8.0)
        assert sink.stats().json()["link"]["target_bitrate"] == 40_000
        # ... and an estimate nobody has refreshed for 10 s no longer holds quality down.
        sink.adapt(0.1, t0 + 18.0)
        assert sink.stats().json()["quality"]["bitrate"] == 1_500_000
        # The link recovers: bandwidth no longer limits the video.
        sink.on_rtc_stats([_outbound(target=40_000, reason=BW)], now=t0 + 19.0)
        sink.adapt(0.1, t0 + 21.0)
        assert sink.stats().json()["quality"]["score"] == pytest.approx(0.5)
        sink.on_rtc_stats([_outbound(target=1_400_000)], now=t0 + 22.0)
        sink.adapt(0.1, t0 + 24.0)
        assert sink.stats().json()["quality"]["score"] == 1.0
    finally:
        await sink.aclose()


class _Participant:
    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish_track(self, track: Any, options: Any) -> None:
        self.published.append(track.name)


class _Room:
    """Stands in for a LiveKit server behind ``rtc.Room`` (none is reachable here): it
    connects at once and answers stats requests with what a test scripts. Only the
    sink's own logic around the room is under test."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats  # called per request: returns publisher stats or raises
        self.connected = False
        self.handlers: dict[str, Any] = {}
        self.local_participant = _Participant()
        self.requests = 0

    async def connect(self, url: str, token: str) -> None:
        self.connected = True

    def on(self, event: str, callback: Any) -> None:
        self.handlers[event] = callback

    def isconnected(self) -> bool:
        return self.connected

    async def disconnect(self) -> None:
        self.connected = False

    def drop(self, reason: str = "test") -> None:
        self.connected = False
        self.handlers["disconnected"](reason)

    async def get_rtc_stats(self) -> Any:
        self.requests += 1
        result = self.stats(self)
        if asyncio.iscoroutine(result):
            result = await result

        class _Stats:
            publisher_stats = result
        return _Stats()


def _sink_with(rooms: list[_Room], stats: Any) -> LiveKitSink:
    def factory() -> rtc.Room:
        rooms.append(_Room(stats))
        return cast(rtc.Room, rooms[-1])
    return LiveKitSink(url="ws://stand-in", token_factory=lambda: "token",
                       stats_interval_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.1,
                       room_factory=factory)


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_connected_sink_polls_stats_and_survives_errors() -> None:
    replies = iter([[_outbound(target=474_342, reason=BW)], RuntimeError("stats failed")])

    def stats(room: _Room) -> Any:
        reply = next(replies, [_outbound(target=474_342, reason=BW)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    rooms: list[_Room] = []
    sink = _sink_with(rooms, stats)
    await sink.start()
    try:
        await _until(lambda: sink.state == "connected" and sink.stats_errors >= 1
                     and rooms[0].requests >= 3)
        assert rooms[0].local_participant.published == ["avatar-video", "avatar-audio"]
        assert sink.stats().json()["link"]["limitation"] == "bandwidth"
        await asyncio.sleep(2.1)  # the controller applies a change at most every 2 s
        sink.adapt(0.1)
        assert sink.stats().json()["quality"]["limited_by"] == "bandwidth"
        assert sink.state == "connected" and len(rooms) == 1  # an error ends nothing
    finally:
        await sink.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "rapido-livekit-stats"]


async def test_disconnect_during_a_stats_reply_still_reconnects() -> None:
    """The room drops just as a stats reply lands (the reply and the poller's cancel
    arrive together, and a cancel can be lost then): the poller must end anyway, so the
    sink goes degraded and reconnects instead of waiting on it for good."""
    asked, reply = asyncio.Event(), asyncio.Event()

    async def stats(room: _Room) -> Any:
        if room is rooms[0]:
            asked.set()
            await reply.wait()
        return [_outbound()]

    rooms: list[_Room] = []
    states: list[str] = []
    sink = _sink_with(rooms, stats)
    sink._on_state = lambda state, reason: states.append(state)
    await sink.start()
    try:
        await asyncio.wait_for(asked.wait(), 5)
        reply.set()
        rooms[0].drop("server left")
        await _until(lambda: len(rooms) >= 2 and sink.state == "connected")
        assert states[:3] == ["connecting", "connected", "degraded"]
        assert sink.retries == 1 and sink.connects == 2
    finally:
        await sink.aclose()


async def test_close_during_a_stats_request() -> None:
    async def never(room: _Room) -> Any:
        await asyncio.Event().wait()

    rooms: list[_Room] = []
    sink = _sink_with(rooms, never)
    await sink.start()
    await _until(lambda: rooms and rooms[0].requests >= 1)
    await asyncio.wait_for(sink.aclose(), 5)
    assert sink.state == "closed" and not rooms[0].connected
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("rapido-livekit")]


def test_link_bounds_validated() -> None:
    with pytest.raises(ValueError, match="min_bitrate"):
        LiveKitSink(url=None, max_bitrate=500_000, min_bitrate=600_000)
    with pytest.raises(ValueError, match="min_bitrate"):
        LiveKitSink(url=None, min_bitrate=0)
    for bad in (0.0, -1.0, 6.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="stats_interval_s"):
            LiveKitSink(url=None, stats_interval_s=bad)
    # A ceiling below the default floor lowers the floor with it.
    assert LiveKitSink(url=None, max_bitrate=100_000).quality.bounds.min_bitrate == 100_000


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def test_unreachable_server_degrades_and_retries() -> None:
    states: list[tuple[str, str | None]] = []
    connects: list[float] = []
    tokens = 0

    def token() -> str:
        nonlocal tokens
        tokens += 1
        return publisher_token(KEY, SECRET, room="lesson_t", identity="rapido-n-s", ttl_s=60)

    sink = LiveKitSink(url=f"ws://127.0.0.1:{_closed_port()}", token_factory=token,
                       connect_timeout_s=3.0, backoff_initial_s=0.05, backoff_max_s=0.2,
                       on_connect=connects.append,
                       on_state=lambda s, r: states.append((s, r)))
    await sink.start()
    try:
        deadline = time.monotonic() + 15
        i = 0
        while sink.retries < 2 and time.monotonic() < deadline:
            sink.write(_chunk(i))
            i += 1
            await asyncio.sleep(0.04)
        st = sink.stats().json()
        assert st["state"] == "degraded", st
        assert st["reason"] and "connect" in st["reason"]
        assert st["retries"] >= 2 and tokens >= 2 and not connects
        assert states[0] == ("connecting", None) and states[1][0] == "degraded"
        # Frames are still accepted and paced through the sources meanwhile.
        await asyncio.sleep(0.3)
        assert sink.frames_captured > 0
        assert sink.stats().json()["frames_unpublished"] == sink.frames_captured
    finally:
        await sink.aclose()


# -- agents avatar protocol -----------------------------------------------------------------

class _Rec:
    def __init__(self) -> None:
        self.fed: list[np.ndarray] = []
        self.events: list[str] = []

    def feed(self, s: np.ndarray) -> None:
        self.fed.append(s)

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate(self.fed) if self.fed else np.zeros(0, np.int16)


def _proto(rec: _Rec, rate: int = 16000,
           on_clear: Any = None) -> agents.AvatarProtocol:
    return agents.AvatarProtocol(
        out_rate=rate, feed=rec.feed,
        on_segment_start=lambda: rec.events.append("start"),
        on_segment_end=lambda: rec.events.append("end"),
        on_clear=on_clear or (lambda: rec.events.append("clear")))


def test_names() -> None:
    assert agents.AUDIO_STREAM_TOPIC == "lk.audio_stream"
    assert agents.RPC_CLEAR_BUFFER == "lk.clear_buffer"
    assert agents.RPC_PLAYBACK_STARTED == "lk.playback_started"
    assert agents.RPC_PLAYBACK_FINISHED == "lk.playback_finished"


@pytest.mark.parametrize("attrs", [
    None, {}, {"sample_rate": "abc", "num_channels": "1"},
    {"sample_rate": "1000", "num_channels": "1"}, {"sample_rate": "16000", "num_channels": "0"},
    {"sample_rate": "16000"},
])
def test_bad_attributes(attrs: Any) -> None:
    with pytest.raises(agents.ProtocolError):
        agents.parse_audio_attributes(attrs)
    rec = _Rec()
    p = _proto(rec)
    with pytest.raises(agents.ProtocolError):
        p.begin_segment(attrs)
    assert p.state == "idle" and rec.events == []


def test_segment_lifecycle_and_payloads() -> None:
    rec = _Rec()
    p = _proto(rec)
    assert p.state == "idle"
    p.begin_segment({"sample_rate": "16000", "num_channels": "1"})
    assert p.state == "receiving" and rec.events == ["start"]
    pcm = (np.arange(1600, dtype=np.int16) - 800).astype("<i2").tobytes()
    # Split mid-sample: the odd byte is carried over.
    p.push(pcm[:1001])
    p.push(pcm[1001:])
    assert np.array_equal(rec.samples, np.arange(1600, dtype=np.int16) - 800)
    started = p.playback_started()
    assert started == agents.OutgoingRpc("lk.playback_started", "{}")
    assert p.state == "playing"
    p.end_segment()
    assert rec.events == ["start", "end"] and p.state == "playing"
    fin = p.playback_finished(1234.5, False)
    assert fin is not None and fin.method == "lk.playback_finished"
    body = json.loads(fin.payload)
    assert body["interrupted"] is False
    assert body["playback_position"] == pytest.approx(1.2345, abs=0.001)
    assert p.state == "finished"
    assert p.playback_finished(1.0, False) is None  # nothing left to finish


def test_stereo_downmix_and_resample() -> None:
    rec = _Rec()
    p = _proto(rec, rate=16000)
    p.begin_segment({"sample_rate": "48000", "num_channels": "2"})
    n = 4800  # 100 ms
    left = np.full(n, 30000, np.int16)
    right = np.full(n, 20000, np.int16)
    inter = np.stack([left, right], axis=1).astype("<i2").tobytes()
    p.push(inter)
    p.end_segment()
    out = rec.samples
    assert out.dtype == np.int16
    assert abs(len(out) - 1600) <= 32  # 100 ms at 16 kHz, within the filter's delay
    assert np.median(out) == pytest.approx(25000, abs=300)  # averaged, no wrap-around


def test_clear_during_playback_reports_interrupted() -> None:
    rec = _Rec()
    out: list[agents.OutgoingRpc | None] = []

    def on_clear() -> None:
        # As the session does: its interrupt reports PlaybackFinished(interrupted=True).
        rec.events.append("clear")
        out.append(p.playback_finished(520.0, True))

    p = _proto(rec, on_clear=on_clear)
    p.begin_segment({"sample_rate": "16000", "num_channels": "1"})
    p.push(np.zeros(3200, np.int16).tobytes())
    p.playback_started()
    assert p.clear() == []  # the session already answered through playback_finished
    assert out[0] is not None
    assert json.loads(out[0].payload) == {"playback_position": 0.52, "interrupted": True}
    assert p.state == "interrupted"
    # The rest of the cleared stream is ignored, and its close is not a segment end.
    n = len(rec.samples)
    p.push(np.ones(1600, np.int16).tobytes())
    p.end_segment()
    assert len(rec.samples) == n and rec.events == ["start", "clear"]
    # Next segment works normally.
    p.begin_segment({"sample_rate": "16000", "num_channels": "1"})
    assert p.state == "receiving"


def test_clear_before_playback_still_answers() -> None:
    rec = _Rec()
    p = _proto(rec)
    p.begin_segment({"sample_rate": "24000", "num_channels": "1"})
    p.end_segment()
    rpcs = p.clear()
    assert len(rpcs) == 1 and rpcs[0].method == "lk.playback_finished"
    assert json.loads(rpcs[0].payload) == {"playback_position": 0.0, "interrupted": True}
    assert p.state == "interrupted"
    # A late PlaybackFinished from the session is not sent twice.
    assert p.playback_finished(100.0, True) is None


def test_clear_when_idle() -> None:
    rec = _Rec()
    p = _proto(rec)
    assert p.clear() == [] and rec.events == ["clear"] and p.state == "idle"


def test_push_outside_segment_is_an_error() -> None:
    p = _proto(_Rec())
    with pytest.raises(agents.ProtocolError):
        p.push(b"\x00\x00")
