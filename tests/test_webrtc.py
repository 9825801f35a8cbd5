"""WebRTC output over WHEP: a real aiortc peer on loopback watches a session."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from rapido.bench.viewer import rtp_timestamp, stamp_arrivals
from rapido.http.whep import VIEWER_SECRET, mint_token
from rapido.node import Node
from rapido.pipeline.media import MediaChunk, VideoFrame
from rapido.webrtc import H264, OPUS, VP8, PacketTrack, WebRtcSink
from tests.conftest import NodeFactory, create_session, speech
from tests.test_ws import next_event, send_jittered


@dataclass
class Received:
    kind: str
    #: time.monotonic() when the frame's first RTP packet arrived: what the network
    #: delivered, not when this in-process client's decoder thread got round to it
    #: (that thread shares the node's cores, and its lag is not the node's pacing).
    arrival: float
    pts_s: float
    samples: int = 0


@dataclass
class Viewer:
    pc: RTCPeerConnection
    location: str
    frames: list[Received] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    #: Per kind, raw RTP timestamp -> monotonic arrival of its first packet.
    rtp_arrivals: dict[str, dict[int, float]] = field(default_factory=dict)

    def of(self, kind: str, since: float = 0.0) -> list[Received]:
        return [f for f in self.frames if f.kind == kind and f.arrival >= since]

    async def close(self) -> None:
        await self.pc.close()
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


def _time_rtp_arrivals(pc: RTCPeerConnection, viewer: Viewer) -> None:
    for t in pc.getTransceivers():
        stamp_arrivals(t.receiver, viewer.rtp_arrivals.setdefault(t.kind, {}), time.monotonic)


async def _read(track: MediaStreamTrack, receiver: Any, viewer: Viewer) -> None:
    seen = viewer.rtp_arrivals[track.kind]
    try:
        while True:
            frame = await track.recv()
            assert frame.pts is not None and frame.time_base is not None
            arrival = seen.pop(rtp_timestamp(frame.pts, receiver), None)
            assert arrival is not None, "a decoded frame whose packets were never seen"
            viewer.frames.append(Received(track.kind, arrival,
                                          float(frame.pts * frame.time_base),
                                          getattr(frame, "samples", 0)))
    except MediaStreamError:
        pass


async def watch(http: aiohttp.ClientSession, whep_url: str, token: str,
                video_codec: str | None = None) -> Viewer:
    """A WHEP client: recvonly video and audio, offer POSTed, answer applied. No ICE
    servers: aiortc's default would look up a public STUN host, and tests have no
    network beyond loopback."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    video = pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    if video_codec is not None:
        caps = RTCRtpSender.getCapabilities("video").codecs
        video.setCodecPreferences([c for c in caps if c.mimeType.lower() == video_codec])
    viewer = Viewer(pc, "")
    _time_rtp_arrivals(pc, viewer)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        receiver = next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)
        viewer.readers.append(asyncio.ensure_future(_read(track, receiver, viewer)))

    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(whep_url, data=pc.localDescription.sdp,
                         headers={"Content-Type": "application/sdp",
                                  "Authorization": f"Bearer {token}"}) as r:
        assert r.status == 201, await r.text()
        assert r.content_type == "application/sdp"
        viewer.location = r.headers["Location"]
        answer = await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return viewer


async def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _watch_and_check(node: Node, http: aiohttp.ClientSession, seconds: float,
                           windows: tuple[float, ...] = ()) -> None:
    """A viewer of a speaking session for ``seconds``, judged over the whole run and,
    as runs of their own, over its first ``windows`` seconds (each a shorter run's
    window: a few frames short at the start fail 24 fps there, not over 30 s)."""
    s = await create_session(http, node, f"rtc{int(seconds)}", sink="webrtc")
    assert s["whep_url"].endswith(f"/whep/{s['session_id']}")
    assert s["viewer_token"] and s["viewer_token"] != node.config.api_key
    viewer = await watch(http, s["whep_url"], s["viewer_token"])
    try:
        async with http.ws_connect(s["ws_url"]) as ws:
            await next_event(ws, "ready")
            # Speech for the whole run so the audio is not just silence.
            sender = asyncio.create_task(send_jittered(ws, speech(seconds + 2.0), 0.0))
            await wait_for(lambda: viewer.of("video") and viewer.of("audio"))
            await asyncio.sleep(1.0)  # past connection set-up and the first keyframe
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            t1 = time.monotonic()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        for first in windows:
            _check_window(viewer, t0, t0 + first, bands=False)
        _check_window(viewer, t0, t1)
        stats = node.engine.sessions[s["session_id"]].sink.stats().json()
        assert stats["dropped_frames"] == 0
        # aiortc offers VP8 first: this run covers the VP8 encoder, the next H.264.
        assert stats["encoders"] == {"video/vp8": 1, OPUS: 1}
    finally:
        await viewer.close()


def _check_window(viewer: Viewer, t0: float, t1: float, *, bands: bool = True) -> None:
    """25 fps, continuous audio, both in step with the wall clock and with each other,
    for what arrived between ``t0`` and ``t1``. Without ``bands`` (a short window inside
    a longer run): rate and continuity only. The arrival bands' percentiles over a few
    seconds turn on six frames, a single slow spell of the shared loop; the run's whole
    window holds those frames too, judged over enough of them."""
    video = [f for f in viewer.of("video", t0) if f.arrival < t1]
    audio = [f for f in viewer.of("audio", t0) if f.arrival < t1]
    span = t1 - t0
    fps = len(video) / span
    assert 24.0 <= fps <= 26.0, fps
    # Continuous audio: no hole in its pts, and the samples fill the pts span exactly.
    received_s = sum(f.samples for f in audio) / 48_000
    pts_span = audio[-1].pts_s + audio[-1].samples / 48_000 - audio[0].pts_s
    assert abs(received_s - pts_span) < 0.03, (received_s, pts_span)
    # And about as many seconds as elapsed: a window's edge, read by arrival, may
    # catch a few 40 ms chunks in flight on a loaded machine (0.12 s seen in CI
    # rehearsals with other work running); that it keeps pace over the run is what
    # the drift bands below hold to a few ms.
    assert abs(received_s - span) < 0.2, (received_s, span)
    gaps = np.diff([f.pts_s for f in audio])
    assert gaps.max() < 0.045, gaps.max()
    if not bands:
        return
    # Both streams follow the wall clock: arrival minus media time stays in a band
    # (no drift, no stall), and the two bands move together, so the audio and
    # video of one instant arrive within 20 ms of each other all run long.
    offsets: dict[str, np.ndarray] = {}
    for kind, frames in (("video", video), ("audio", audio)):
        off = np.array([f.arrival - f.pts_s for f in frames])
        off -= np.median(off)
        offsets[kind] = off
        # A chunk's two 20 ms Opus packets leave together, so audio's band is one
        # packet wider than video's: the second is 20 ms early, never late. On a quiet
        # machine video's band is under 15 ms. Arrivals are stamped on the event loop
        # the node shares with this client, so a late loop shows twice: loaded CI runs
        # read 26 ms over 30 s and 48 ms over a 5 s window. A viewer's jitter buffer
        # absorbs that; what must fail is a stall, a clock pass that skips frames
        # (two frames late: 80 ms), so the bands stop short of it.
        band = 0.065 if kind == "video" else 0.085
        assert np.percentile(off, 95) - np.percentile(off, 5) < band, kind
    # Drift: where each band sits in the second half of the run against the first.
    # Audio's band has two modes 20 ms apart (first and second packet of a chunk),
    # half the packets each; a median would land on either mode by chance, so audio
    # is placed by its upper mode (the first packets: 75th percentile).
    def drift(off: np.ndarray, q: float) -> float:
        half = len(off) // 2
        return float(np.percentile(off[half:], q) - np.percentile(off[:half], q))

    drift_v, drift_a = drift(offsets["video"], 50), drift(offsets["audio"], 75)
    print(f"drift over {span:.0f} s: video {1e3 * drift_v:+.1f} ms, "
          f"audio {1e3 * drift_a:+.1f} ms")
    assert abs(drift_v - drift_a) < 0.020, (drift_v, drift_a)
    # Every picture arrives together with audio (sent in the same callback).
    a_arr = np.array([f.arrival for f in audio])
    near = [np.min(np.abs(a_arr - f.arrival)) for f in video]
    assert np.percentile(near, 95) < 0.020


@pytest.mark.slow
async def test_viewer_gets_25fps_and_continuous_synced_audio_30s(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    """30 s of a viewer, judged over the 30 s and over its first 5 s as a run of its own
    (what a separate 5 s test with a node and a viewer of its own checked)."""
    # The transport under test, not adaptive quality: the in-process client's decoding
    # shares this machine's cores, which must not thin the frames being counted.
    node = await make_node(model="none", min_fps=25)
    await _watch_and_check(node, http, 30.0, windows=(5.0,))


async def test_two_viewers_share_one_encoder_and_delete_ends_one(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    # min_fps = fps: frames are counted below, which node load must not thin.
    node = await make_node(model="none", api_key="k" * 16, min_fps=25.0)
    auth = {"Authorization": f"Bearer {'k' * 16}"}
    s = await create_session(http, node, "rtc-two", headers=auth, sink="webrtc")
    sink = node.engine.sessions[s["session_id"]].sink
    assert isinstance(sink, WebRtcSink)
    a = await watch(http, s["whep_url"], s["viewer_token"], video_codec=H264)
    b = await watch(http, s["whep_url"], s["viewer_token"], video_codec=H264)
    try:
        await wait_for(lambda: len(a.of("video")) > 10 and len(b.of("video")) > 10)
        assert sink.stats().json()["encoders"] == {H264: 1, OPUS: 1}
        assert sink.stats().json()["encoders_created"] == 2
        assert sink.stats().json()["consumers"] == {H264: 2, OPUS: 2}
        async with http.get(f"{node.url}/metrics") as r:
            assert "webrtc_encoders 2.0" in await r.text()
        # A PLI/FIR from b reaches aiortc's sender as _send_keyframe(): it must make
        # the shared encoder emit a keyframe (aiortc alone would only set a flag that
        # packet tracks never read).
        server_pc = sink.viewers[b.location.rsplit("/", 1)[1]].pc
        video_sender = next(x for x in server_pc.getSenders()
                            if x.track is not None and x.track.kind == "video")
        enc = sink.encoders[H264]
        await wait_for(lambda: not enc.keyframe)
        video_sender._send_keyframe()
        assert enc.keyframe
        await wait_for(lambda: not enc.keyframe)
        # DELETE ends viewer a; b keeps playing, on the same encoders.
        async with http.delete(f"{node.url}{a.location}",
                               headers={"Authorization": f"Bearer {s['viewer_token']}"}) as r:
            assert r.status == 200
        await wait_for(lambda: a.pc.connectionState == "closed" or
                       sink.stats().json()["viewers"] == 1)
        assert sink.stats().json()["viewers"] == 1
        # Counted by when their packets arrived (a's decoder may still hand out
        # pictures it already held): after the close, nothing new reaches a while b
        # goes on receiving.
        closed = time.monotonic()
        n_b = len(b.of("video"))
        await wait_for(lambda: len(b.of("video")) >= n_b + 8)
        assert len(a.of("video", closed + 0.1)) <= 1
        assert sink.stats().json()["encoders"] == {H264: 1, OPUS: 1}
        # The last viewer leaving stops the encoders: nobody watching costs nothing.
        await b.close()
        await wait_for(lambda: sink.stats().json()["encoders"] == {})
        async with http.delete(f"{node.url}{a.location}",
                               headers={"Authorization": f"Bearer {s['viewer_token']}"}) as r:
            assert r.status == 404
    finally:
        await a.close()
        await b.close()


async def test_bad_whep_requests(make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none")
    s = await create_session(http, node, "rtc-bad", sink="webrtc")
    url, token = s["whep_url"], s["viewer_token"]
    sdp = {"Content-Type": "application/sdp"}

    async def post(target: str, body: str, tok: str) -> tuple[int, dict[str, Any]]:
        async with http.post(target, data=body,
                             headers={**sdp, "Authorization": f"Bearer {tok}"}) as r:
            return r.status, await r.json()

    status, body = await post(url, "this is not sdp", token)
    assert (status, body["error"]) == (400, "invalid_sdp")
    status, body = await post(url, "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\n", token)
    assert (status, body["error"]) == (400, "invalid_sdp")
    status, body = await post(f"{node.url}/whep/{'0' * 32}", "v=0\r\n", token)
    assert (status, body["error"]) == (404, "session_not_found")
    # A token for another session, a forged one, an expired one, none at all.
    other = await create_session(http, node, "rtc-other", sink="webrtc")
    for bad in (other["viewer_token"], token[:-4] + "0000",
                mint_token(b"nope", s["session_id"], 60)):
        status, body = await post(url, "v=0\r\n", bad)
        assert (status, body["error"]) == (401, "unauthorized"), bad
    app = node.app  # the node's secret, a token that expired a minute ago
    expired = mint_token(app[VIEWER_SECRET], s["session_id"], -60)
    status, body = await post(url, "v=0\r\n", expired)
    assert status == 401 and "expired" in body["message"]
    async with http.post(url, data="v=0\r\n", headers=sdp) as r:
        assert r.status == 401
    # ?token= works too (a player page may not set headers); the API key does not.
    async with http.post(f"{url}?token={token}", data="garbage", headers=sdp) as r:
        assert r.status == 400
    # A session with another sink has no viewers.
    plain = await create_session(http, node, "rtc-null")
    assert "whep_url" not in plain
    status, body = await post(f"{node.url}/whep/{plain['session_id']}", "v=0\r\n",
                              mint_token(app[VIEWER_SECRET], plain["session_id"], 60))
    assert (status, body["error"]) == (409, "not_webrtc")
    # The stream kept going through all of it.
    sink = node.engine.sessions[s["session_id"]].sink
    before = sink.stats().json()["frames_in"]
    await wait_for(lambda: sink.stats().json()["frames_in"] >= before + 5)


async def test_encoded_audio_and_video_of_a_chunk_share_a_timestamp() -> None:
    """The pts relationship: the packets of chunk n carry n * 40 ms in both streams
    (audio less Opus's 6.5 ms look-ahead), so receivers can line them up."""
    sink = WebRtcSink(width=64, height=48, fps=25)
    await sink.start()
    video, audio = PacketTrack(sink, "video"), PacketTrack(sink, "audio")
    video.bind(H264)
    audio.bind(OPUS)
    got: dict[str, list[float]] = {"video": [], "audio": []}
    keyframes: list[int] = []

    async def pull(track: PacketTrack) -> None:
        while True:
            p = await track.recv()
            assert p.pts is not None and p.time_base is not None
            if track.kind == "video" and p.is_keyframe:
                keyframes.append(len(got["video"]))
            got[track.kind].append(float(p.pts * p.time_base))

    readers = [asyncio.ensure_future(pull(t)) for t in (video, audio)]
    picture = VideoFrame(np.full((72, 64), 128, np.uint8), 64, 48)
    try:
        await asyncio.sleep(0.05)  # both tracks joined
        for i in range(20):
            sink.write(MediaChunk(i, picture, np.zeros(1920, np.int16), False))
            await asyncio.sleep(0.01)
        await wait_for(lambda: len(got["video"]) >= 20 and len(got["audio"]) >= 38)
        assert sink.stats().json()["encoders"] == {H264: 1, OPUS: 1}
        for i, v in enumerate(got["video"][:20]):
            a = got["audio"][2 * i]
            assert abs(v - i * 0.04) < 1e-6
            assert abs(a - v) < 0.020, (i, a, v)
        # A keyframe to start with, then only on request (what a PLI/FIR ends in).
        assert keyframes == [0]
        sink.request_keyframe(H264)
        sink.write(MediaChunk(20, picture, np.zeros(1920, np.int16), False))
        await wait_for(lambda: len(got["video"]) >= 21)
        assert keyframes == [0, 20]
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await sink.aclose()


# -- adaptive quality ------------------------------------------------------------------


class Lossy:
    """Make a client's network drop ``loss`` of its incoming ``kind`` RTP (the client,
    not the server, is patched: this stands in for a lossy path, nothing we ship)."""

    def __init__(self, pc: RTCPeerConnection, kind: str, loss: float, seed: int = 7) -> None:
        self.loss = loss
        rng = np.random.default_rng(seed)
        for t in pc.getTransceivers():
            if t.kind != kind:
                continue
            original = t.receiver._handle_rtp_packet

            async def handle(packet: Any, arrival_time_ms: int, _orig: Any = original) -> None:
                if rng.random() >= self.loss:
                    await _orig(packet, arrival_time_ms=arrival_time_ms)

            t.receiver._handle_rtp_packet = handle  # type: ignore[method-assign]


async def test_lossy_viewer_lowers_the_bitrate_then_recovers(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    # min_fps = fps: this is about the connection; a busy machine must not make the
    # node's own load step the frame rate down (limited_by would say "cpu").
    node = await make_node(model="none", webrtc_video_bitrate=1_000_000,
                           webrtc_min_bitrate=150_000, min_fps=25.0)
    s = await create_session(http, node, "rtc-lossy", sink="webrtc")
    sink = node.engine.sessions[s["session_id"]].sink
    assert isinstance(sink, WebRtcSink)
    viewer = await watch(http, s["whep_url"], s["viewer_token"], video_codec=H264)
    path = Lossy(viewer.pc, "video", 0.3)
    try:
        # Receiver reports come about once a second; each at ~30 % loss cuts the
        # estimate by ~15 %, and the encoder follows at most every 2 s.
        await wait_for(lambda: sink.stats().json()["quality"]["bitrate"] < 700_000, timeout=20)
        q = sink.stats().json()["quality"]
        assert q["limited_by"] == "bandwidth" and q["fps"] == 25
        assert 0.5 <= q["score"] < 1.0
        (rep,) = sink.stats().json()["receivers"].values()
        assert rep["loss"] > 0.1 and rep["reports"] >= 3
        # The new bitrate reaches the encoder with the next frame: re-opened at that rate.
        await wait_for(lambda: sink.encoders[H264].bitrate <= q["bitrate"])
        assert sink.stats().json()["encoders_created"] >= 3
        # The node's gauge carries it.
        node.engine.publish_quality()
        async with http.get(f"{node.url}/metrics") as r:
            text = await r.text()
        score = float(next(ln.split()[1] for ln in text.splitlines()
                           if ln.startswith("video_quality_score ")))
        assert score == pytest.approx(q["score"], abs=0.01)
        # The path heals: pictures decode again and the bitrate climbs back up.
        path.loss = 0.0
        low = sink.stats().json()["quality"]["bitrate"]
        n = len(viewer.of("video"))
        await wait_for(lambda: len(viewer.of("video")) > n + 25, timeout=15)
        await wait_for(lambda: sink.stats().json()["quality"]["bitrate"] > low, timeout=15)
    finally:
        await viewer.close()


async def test_loss_free_viewer_keeps_full_quality(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    # min_fps = fps: the node's own load (a busy CI machine) cannot thin frames here;
    # this test is about the connection's feedback alone.
    node = await make_node(model="none", min_fps=25.0)
    s = await create_session(http, node, "rtc-clean", sink="webrtc")
    sink = node.engine.sessions[s["session_id"]].sink
    assert isinstance(sink, WebRtcSink)
    viewer = await watch(http, s["whep_url"], s["viewer_token"], video_codec=H264)
    try:
        # aiortc's receiver sends its first REMB once its bitrate estimator has a
        # window of packets; on a loaded CI machine that can come after the 4th report.
        await wait_for(lambda: any(r["reports"] >= 4 and r["remb"] is not None
                                   for r in sink.stats().json()["receivers"].values()), timeout=40)
        q = sink.stats().json()["quality"]
        assert (q["bitrate"], q["fps"], q["score"], q["limited_by"]) == \
            (node.config.webrtc_video_bitrate, 25, 1.0, None)
        # The viewer's REMB reached the controller too (aiortc sends one, as Chrome
        # does without transport-cc); here it is above the ceiling, so it caps nothing.
        (rep,) = sink.stats().json()["receivers"].values()
        assert rep["remb"] is not None and rep["loss"] == 0.0
        assert sink.stats().json()["encoders_created"] == 2  # never re-opened
    finally:
        await viewer.close()


async def test_node_load_thins_frames_and_recovers() -> None:
    """adapt() is the engine's once-a-second load sample; fed sample times, the sink
    halves its frame rate under load and a real viewer sees it, audio untouched."""
    sink = WebRtcSink(width=64, height=48, fps=25, min_fps=12.5)
    await sink.start()
    video, audio = PacketTrack(sink, "video"), PacketTrack(sink, "audio")
    video.bind(H264)
    audio.bind(OPUS)
    got: dict[str, list[float]] = {"video": [], "audio": []}

    async def pull(track: PacketTrack) -> None:
        while True:
            p = await track.recv()
            assert p.pts is not None and p.time_base is not None
            got[track.kind].append(float(p.pts * p.time_base))

    readers = [asyncio.ensure_future(pull(t)) for t in (video, audio)]
    picture = VideoFrame(np.full((72, 64), 128, np.uint8), 64, 48)
    index = 0

    async def frames(n: int) -> None:
        nonlocal index
        for _ in range(n):
            sink.write(MediaChunk(index, picture, np.zeros(1920, np.int16), False))
            index += 1
            await asyncio.sleep(0.005)
        await wait_for(lambda: sink.stats().json()["frames_encoded"] == index)

    try:
        await asyncio.sleep(0.05)
        await frames(25)
        assert len(got["video"]) == 25
        t = 1000.0
        for _ in range(8):  # 4 s over the limit: down the ladder to the floor
            sink.adapt(1.5, t)
            t += 0.5
        assert sink.stats().json()["quality"]["fps"] == 12.5
        assert sink.stats().json()["quality"]["limited_by"] == "cpu"
        v0, a0 = len(got["video"]), len(got["audio"])
        await frames(50)
        assert len(got["video"]) - v0 == 25  # every other frame
        assert len(got["audio"]) - a0 == 100  # all the audio (2 Opus packets a frame)
        # RTP time still comes from the frame index: evenly 80 ms apart now.
        assert np.allclose(np.diff(got["video"][v0:]), 0.08)
        for _ in range(60):  # a quiet node climbs back, one rung per 5 s
            sink.adapt(0.2, t)
            t += 0.5
        assert sink.stats().json()["quality"]["fps"] == 25
        v0 = len(got["video"])
        await frames(25)
        assert len(got["video"]) - v0 == 25
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await sink.aclose()


async def test_a_falling_behind_encoder_counts_as_load() -> None:
    sink = WebRtcSink(width=64, height=48, fps=25, min_fps=12.5, warm=True, max_queue=2)
    await sink.start()
    picture = VideoFrame(np.full((72, 64), 128, np.uint8), 64, 48)
    try:
        for i in range(50):  # far faster than any encoder: the queue overflows
            sink.write(MediaChunk(i, picture, np.zeros(1920, np.int16), False))
        assert sink.stats().json()["dropped_frames"] > 0
        sink.adapt(0.0, 0.0)
        # Dropped chunks are stutter: the score says so even before any adaptation.
        assert sink.quality_score() < 0.8  # smoothed: a third of the way per sample
        assert sink.stats().json()["quality"]["score"] == round(sink.quality_score(), 3)
        for i in range(50, 100):  # and it goes on dropping
            sink.write(MediaChunk(i, picture, np.zeros(1920, np.int16), False))
        sink.adapt(0.0, 1.1)
        assert sink.stats().json()["quality"]["fps"] < 25
    finally:
        await sink.aclose()


async def test_warm_encoders_run_without_viewers_in_the_chosen_codec() -> None:
    with pytest.raises(ValueError):
        WebRtcSink(width=64, height=48, fps=25, warm=True, warm_codec="video/av1")
    sink = WebRtcSink(width=64, height=48, fps=25, warm=True, warm_codec=VP8)
    await sink.start()
    picture = VideoFrame(np.full((72, 64), 128, np.uint8), 64, 48)
    try:
        for i in range(3):
            sink.write(MediaChunk(i, picture, np.zeros(1920, np.int16), False))
        await wait_for(lambda: sink.stats().json()["video_frames_encoded"] == 3)
        assert sink.stats().json()["encoders"] == {OPUS: 1, VP8: 1}
        assert sink.stats().json()["viewers"] == 0
    finally:
        await sink.aclose()


def test_feedback_from_an_unknown_or_departed_viewer_is_ignored() -> None:
    from aiortc.rtp import RtcpReceiverInfo, RtcpRrPacket

    sink = WebRtcSink(width=64, height=48, fps=25, min_bitrate=100_000)
    report = RtcpRrPacket(ssrc=1, reports=[RtcpReceiverInfo(
        ssrc=42, fraction_lost=200, packets_lost=10, highest_sequence=100, jitter=0,
        lsr=0, dlsr=0)])
    # A receiver report racing remove_viewer (aiortc stops the receiver first) must not
    # bring the viewer back into the bitrate decision.
    sink._on_feedback("gone", 42, report)
    assert sink.stats().json()["receivers"] == {}
    assert sink.stats().json()["quality"]["bitrate"] == sink.video_bitrate


async def test_a_whep_viewer_keeps_a_silent_session_open(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    """session_idle_timeout_s closes sessions with no audio and no listener; someone
    watching over WHEP is a listener, and the timeout starts again when they leave."""
    node = await make_node(model="none", session_idle_timeout_s=2.0)
    watched = await create_session(http, node, "idle-watched", sink="webrtc")
    forgotten = await create_session(http, node, "idle-forgotten", sink="webrtc")
    viewer = await watch(http, watched["whep_url"], watched["viewer_token"])
    try:
        await wait_for(lambda: forgotten["session_id"] not in node.engine.sessions, 6.0)
        await asyncio.sleep(1.0)  # well past the timeout: the watched one stays
        assert watched["session_id"] in node.engine.sessions
        assert node.engine.sessions[watched["session_id"]].sink.audience() == 1
    finally:
        await viewer.close()
        async with http.delete(f"{node.url}{viewer.location}",
                               headers={"Authorization": f"Bearer {watched['viewer_token']}"}):
            pass
    t_left = time.monotonic()
    await wait_for(lambda: watched["session_id"] not in node.engine.sessions, 6.0)
    # A whole timeout after the viewer left, less the once-a-second sweep's granularity.
    assert time.monotonic() - t_left >= 1.0
