"""LiveKit end to end: a real node publishes a ``livekit`` session through the real SDK to
the loopback stand-in (``tests/livekit_standin.py``), which decodes what arrives.

One node, one stand-in and one session serve the whole module (they are costly to start
and CI is short): the tests run in file order on the same run, the outage last."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from livekit import api, rtc
from livekit.protocol import models

from rapido.config import Config
from rapido.gpu.portrait import default_avatar
from rapido.livekit.tokens import publisher_token
from rapido.node import Node
from rapido.pipeline.lipsync_lag import LagMeter, LagResult, mouth_region
from rapido.pipeline.speech import syllables
from tests.conftest import create_session
from tests.livekit_standin import Media, Participant, StandIn
from tests.test_ws import next_event, send_jittered

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

KEY, SECRET = "devkey", "devsecret-that-is-long-enough-for-hs256"
W, H, FPS, RATE = 854, 480, 25, 48_000
LESSON = "e2e"
ROOM = f"lesson_{LESSON}"
#: Seconds of speech the session plays while the stand-in decodes.
SPEECH_S = 12.0


@dataclass
class Run:
    node: Node
    standin: StandIn
    http: aiohttp.ClientSession
    session: dict[str, Any]
    publisher: Participant
    spoken: tuple[float, float]  # monotonic: speech sent from .. to


def _mouth(y: np.ndarray) -> np.ndarray:
    rows, cols = mouth_region(default_avatar().mouth_boxes, 12, y.shape[1], y.shape[0])
    return y[rows, cols].copy()


async def _until(what: str, ok: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path
              ) -> AsyncIterator[Run]:
    standin = StandIn(KEY, SECRET, rooms={ROOM, "lesson_other-ok"}, keep=_mouth)
    await standin.start()
    tmp = tmp_path_factory.mktemp("lk-e2e")
    # min_fps 25: the stand-in decodes on the node's cores and must not thin the frames
    # being measured.
    node = Node(Config(port=0, recordings_dir=str(tmp / "rec"), log_level="warning",
                       model_dir=str(model_dir), avatars_dir=str(tmp / "avatars"),
                       livekit_url=standin.url, livekit_api_key=KEY,
                       livekit_api_secret=SECRET, min_fps=25))
    await node.start()
    http = aiohttp.ClientSession()
    try:
        s = await create_session(http, node, LESSON, sink="livekit", sample_rate=16_000)
        await _until("the publisher's media", lambda: any(
            p.media.pictures and p.media.sounds for p in standin.live()))
        publisher = standin.live()[0]
        async with http.ws_connect(s["ws_url"]) as ws:
            await next_event(ws, "ready")
            t0 = time.monotonic()
            await send_jittered(ws, syllables(SPEECH_S, seed=41), jitter_s=0.01)
            await ws.send_json({"type": "end"})
            await next_event(ws, "playback_finished")
            t1 = time.monotonic()
            await asyncio.sleep(1.2)  # past the last sender reports
        yield Run(node, standin, http, s, publisher, (t0, t1))
    finally:
        await http.close()
        await node.stop()
        await standin.aclose()


def lag_of(media: Media, t0: float, t1: float) -> LagResult:
    """The lip-sync lag of what arrived between ``t0`` and ``t1``, each picture and sound
    placed on the sender's clock by its RTCP sender reports."""
    m = LagMeter(RATE)
    for s in media.sounds:
        if t0 <= s.at <= t1:
            m.add_audio(media.sender_time("audio", s.rtp, s.rate), s.samples)
    for p in media.pictures:
        if t0 <= p.at <= t1 and p.kept is not None:
            m.add_picture(media.sender_time("video", p.rtp, 90_000), p.kept)
    return m.result()


async def test_publishes_854x480_at_25fps_with_48khz_audio_in_sync(run: Run) -> None:
    """The stream as decoded at the stand-in while the session speaks: the configured
    size, every picture at 25 fps, 48 kHz sound without a gap, one clock, lip-synced."""
    media = run.publisher.media
    t0, t1 = run.spoken
    pics = [p for p in media.pictures if t0 <= p.at <= t1]
    sounds = [s for s in media.sounds if t0 <= s.at <= t1]
    video = next(r for r in run.publisher.add_track_requests if r.type == models.VIDEO)
    assert (video.width, video.height) == (W, H) and len(video.layers) == 1  # no simulcast
    # libwebrtc crops the width to a multiple of 4 (two columns of 854; a 858-wide source
    # arrives 856 wide); nothing is scaled.
    sizes = Counter((p.width, p.height) for p in pics)
    assert sizes == {(W - W % 4, H): len(pics)}, sizes
    span = (pics[-1].rtp - pics[0].rtp) / 90_000
    fps = (len(pics) - 1) / span
    worst_gap_ms = float(np.diff([p.rtp for p in pics]).max()) / 90.0
    assert span >= SPEECH_S - 0.5
    assert 24.5 <= fps <= 25.5 and worst_gap_ms < 60.0, (fps, worst_gap_ms)
    assert {s.rate for s in sounds} == {RATE}
    holes = [(b.rtp - a.rtp - a.samples.size) & 0xFFFFFFFF
             for a, b in itertools.pairwise(sounds)]
    assert not any(holes), f"{sum(1 for h in holes if h)} gaps in the sound"
    heard = sum(s.samples.size for s in sounds) / RATE
    assert heard >= SPEECH_S - 0.5
    # Sender reports of both kinds put their RTP clocks on the sender's one clock: as
    # they arrive (over loopback, at once), that clock reads the same for both.
    skew_ms = 1000 * abs(media.clock_offset("audio") - media.clock_offset("video"))
    assert skew_ms <= 20.0, skew_ms
    res = lag_of(media, t0, t1)
    print(f"\nlivekit e2e: {sizes}, {fps:.2f} fps over {span:.1f} s (worst gap "
          f"{worst_gap_ms:.0f} ms), {heard:.1f} s of {RATE} Hz sound, clock skew "
          f"{skew_ms:.1f} ms, lip-sync lag {res.lag_ms:+.1f} ms (r {res.corr:.2f}, margin "
          f"{res.margin:.2f}, {res.frames} frames)")
    assert res.margin > 0.2, "the correlation has no single peak"
    assert abs(res.lag_ms) <= 40.0, res.lag_ms


async def test_tokens_grant_exactly_what_each_side_needs(run: Run) -> None:
    """The node's token: verified by the stand-in, publish-only for the lesson's room;
    its auto-subscription refused. The viewer token: subscribe-only, hidden, and its
    subscription granted. A token for another room, or a stale or forged one, is
    refused."""
    pub = run.publisher
    assert pub.identity.startswith("rapido-") and pub.room == ROOM and pub.path == "/rtc/v1"
    assert pub.claims.video == api.VideoGrants(room_join=True, room=ROOM, can_publish=True,
                                               can_subscribe=False, can_publish_data=False)
    assert pub.wants_subscribe and pub.subscribe_refused
    assert [t.sid[:3] for t in pub.tracks] == ["TR_", "TR_"] and pub.sid.startswith("PA_")

    viewer = rtc.Room()
    await viewer.connect(run.standin.url, run.session["viewer_token"])
    try:
        v = run.standin.live()[-1]
        assert v.room == ROOM and v.identity.startswith("viewer-")
        assert v.claims.video == api.VideoGrants(room_join=True, room=ROOM, can_publish=False,
                                                 can_subscribe=True, can_publish_data=False,
                                                 hidden=True)
        assert v.wants_subscribe and not v.subscribe_refused
        # The publisher sees no viewer (hidden); the viewer sees the publisher's tracks.
        remote = viewer.remote_participants.get(pub.identity)
        assert remote is not None and len(remote.track_publications) == 2
    finally:
        await viewer.disconnect()

    refused = len(run.standin.rejections)
    forged = api.AccessToken(KEY, "another-secret-that-is-long-enough-for-hs256")
    stale = api.AccessToken(KEY, SECRET).with_ttl(datetime.timedelta(minutes=-5))
    for token in (publisher_token(KEY, SECRET, room="lesson_elsewhere", identity="x", ttl_s=60),
                  _publisher(forged), _publisher(stale)):
        with pytest.raises(rtc.ConnectError):
            await rtc.Room().connect(run.standin.url, token)
    reasons = [r.reason for r in run.standin.rejections[refused:]]
    assert len(reasons) == 3, reasons
    assert "does not exist" in reasons[0] and "Signature" in reasons[1]
    assert "expired" in reasons[2].lower(), reasons[2]


def _publisher(token: api.AccessToken) -> str:
    return (token.with_identity("x").with_grants(
        api.VideoGrants(room_join=True, room=ROOM, can_subscribe=False)).to_jwt())


async def test_legacy_rtc_path_when_v1_is_missing(run: Run) -> None:
    """A server without ``/rtc/v1`` (404): the SDK joins on ``/rtc``, negotiates its
    publisher connection there, and its sound arrives."""
    run.standin.v1 = False
    room = rtc.Room()
    source = rtc.AudioSource(RATE, 1, queue_size_ms=100)
    try:
        token = publisher_token(KEY, SECRET, room=ROOM, identity="legacy-client", ttl_s=60)
        await room.connect(run.standin.url, token)
        p = run.standin.find("legacy-client")[-1]
        assert p.path == "/rtc" and p.offers >= 1
        await room.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("tone", source),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        tone = (8000 * np.sin(np.arange(RATE // 50) * 2 * np.pi * 440 / RATE)).astype(np.int16)
        for _ in range(25):
            await source.capture_frame(rtc.AudioFrame(tone.tobytes(), RATE, 1, tone.size))
        await _until("the legacy client's sound", lambda: len(p.media.sounds) >= 10)
        assert p.tracks and p.tracks[0].sid.startswith("TR_")
        assert max(int(np.abs(s.samples).max()) for s in p.media.sounds) > 4000
    finally:
        run.standin.v1 = True
        await room.disconnect()
        await source.aclose()


async def _state(run: Run, sid: str) -> str:
    async with run.http.get(f"{run.node.url}/api/sessions/{sid}") as r:
        return str((await r.json())["stats"]["sink"]["state"])


async def test_outage_degrades_then_republishes(run: Run) -> None:
    """The stand-in down for 2 s: the session reports ``degraded`` (the SDK is
    reconnecting), then is connected and publishing again within 5 s of the return;
    another session on the node plays on meanwhile; the connect time was observed."""
    sid = run.session["session_id"]
    other = await create_session(run.http, run.node, "e2e-plain")
    seen: list[str] = []
    outage = asyncio.create_task(run.standin.outage(2.0))
    async with run.http.ws_connect(other["ws_url"]) as ws:
        await next_event(ws, "ready")
        while not outage.done():
            seen.append(await _state(run, sid))
            await asyncio.sleep(0.1)
        await send_jittered(ws, syllables(0.6, seed=3), jitter_s=0.0)
        await ws.send_json({"type": "end"})
        finished = await next_event(ws, "playback_finished")
        assert abs(finished["position_ms"] - 600) <= 40
    await outage
    back = run.standin.downtime[-1][1]
    assert "degraded" in seen, seen
    ident = run.publisher.identity
    await _until("the session back at the stand-in", lambda: any(
        p.media.pictures and p.media.sounds for p in run.standin.find(ident) if not p.left),
        timeout=8.0)
    again = next(p for p in run.standin.find(ident) if not p.left)
    took = min(again.media.pictures[0].at, again.media.sounds[0].at) - back
    first = max(again.media.pictures[0].at, again.media.sounds[0].at) - back
    print(f"\nlivekit e2e: media again {took:.2f} s after the return (both kinds {first:.2f} s)")
    assert first <= 5.0, first
    assert len(again.tracks) == 2 and await _state(run, sid) == "connected"
    async with run.http.get(f"{run.node.url}/metrics") as r:
        text = await r.text()
    count = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("livekit_connection_seconds_count"))
    assert count >= 1
