"""The engine end to end: a recorded session holds exactly what was sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from rapido.config import Config
from rapido.engine import Engine, RenderSetup
from rapido.gpu.portrait import default_avatar
from rapido.metrics import Metrics
from rapido.node import Node
from rapido.pipeline.audio import resample
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.provider import SinkFactory
from rapido.pipeline.render import IdleRenderer
from rapido.pipeline.session import SessionSpec, StreamSession
from rapido.pipeline.sinks.base import SinkError
from rapido.pipeline.sinks.null import NullSink
from rapido.wiring import engine_settings
from tests.conftest import NodeFactory, create_session, eventually, speech
from tests.test_ws import next_event, send_jittered

FRAME = AUDIO_RATE // 25


def decode(path: Path) -> tuple[int, np.ndarray]:
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    if audio.dtype != np.int16:  # AAC decodes to float planar
        audio = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    return frames, audio


async def test_recorded_mp4_holds_the_audio_sent(make_node: NodeFactory, tmp_path: Path,
                                                 http: aiohttp.ClientSession) -> None:
    # Time-stretching off (and the start level a buffer needs without it): the file is
    # compared with what was sent, sample for sample; stretched playout is held to its
    # accounting in tests/test_jitter_stretch.py.
    node = await make_node(recordings_dir=str(tmp_path / "rec"), jitter_stretch=False,
                           jitter_start_ms=128.0)
    s = await create_session(http, node, "rec", sample_rate=16_000, sink="record")
    sent = [speech(1.2, seed=1), speech(0.8, seed=2)]
    async with http.ws_connect(s["ws_url"]) as ws:
        await next_event(ws, "ready")
        for utterance in sent:
            await send_jittered(ws, utterance, jitter_s=0.02)
            await ws.send_json({"type": "end"})
            await next_event(ws, "playback_finished")
    async with http.delete(f"{node.url}/api/sessions/{s['session_id']}") as r:
        stats = (await r.json())["stats"]
    path = Path(stats["sink"]["path"])
    assert stats["sink"]["dropped_frames"] == 0, stats
    assert path.exists() and path.stat().st_size > 10_000
    frames, audio = decode(path)

    # Video frames x 40 ms equals the audio duration within one frame.
    assert frames == stats["frames_out"]
    assert abs(frames * FRAME - len(audio)) <= FRAME

    # Each utterance is in the file, resampled, intact, starting on a frame boundary.
    # Each utterance is in the file, resampled and intact, starting on a frame boundary
    # (frame n covers audio [n*40 ms, (n+1)*40 ms)): search the frame-aligned offsets.
    x = audio.astype(np.float64)
    cursor = 0
    for utterance in sent:
        want = resample(utterance, 16_000).astype(np.float64)
        best, offset = -1.0, -1
        for start in range(cursor - cursor % FRAME, len(x) - len(want) + 1, FRAME):
            for off in range(max(0, start - 2), start + 3):
                got = x[off : off + len(want)]
                if len(got) < len(want):
                    continue
                sim = float(got @ want / (np.sqrt((got @ got) * (want @ want)) + 1e-9))
                if sim > best:
                    best, offset = sim, off
        assert best > 0.99, best
        assert offset >= cursor
        cursor = offset + len(want)
    # Everything else in the recording is silence: nothing extra was played.
    speech_energy = sum(float(np.sum(resample(u, 16_000).astype(np.float64) ** 2))
                        for u in sent)
    total_energy = float(np.sum(audio.astype(np.float64) ** 2))
    assert abs(total_energy - speech_energy) / speech_energy < 0.02


async def test_idle_session_shows_idle_frames(node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "idle")
    session = node.engine.sessions[s["session_id"]]
    before = session.counters.frames_out
    await eventually(lambda: session.counters.frames_out - before >= 8, "idle frames flow")
    assert session.counters.speaking_frames == 0
    assert session.sink.stats().json()["speaking_frames"] == 0


async def test_idle_timeout_closes_forgotten_sessions(make_node: NodeFactory,
                                                      http: aiohttp.ClientSession) -> None:
    node = await make_node(session_idle_timeout_s=1.0)
    forgotten = await create_session(http, node, "forgotten")
    watched = await create_session(http, node, "watched")
    async with http.ws_connect(watched["ws_url"]) as ws:
        await next_event(ws, "ready")
        for _ in range(60):
            if forgotten["session_id"] not in node.engine.sessions:
                break
            await asyncio.sleep(0.1)
        assert forgotten["session_id"] not in node.engine.sessions
        # A session with a listener is not idle, however silent it is.
        assert watched["session_id"] in node.engine.sessions
        # Read while still listening: once the socket closes, the watched session is
        # idle too and the next sweep may close it.
        async with http.get(f"{node.url}/metrics") as r:
            assert "concurrent_streams_total 1.0" in await r.text()


async def test_a_stalling_node_sheds_frame_rate_on_its_publishers(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    """Frames leaving late (a loop blocked 120 ms of every 200) is node load: once a
    second the engine samples it, the webrtc publisher steps its frame rate down and
    video_quality_score says so; a session on the null sink has no publisher quality."""
    node = await make_node(model="none", min_fps=12.5, webrtc_warm_encoders=True)
    s = await create_session(http, node, "stall", sink="webrtc")
    await create_session(http, node, "plain")
    sink = node.engine.sessions[s["session_id"]].sink

    async def stall() -> None:
        while True:
            time.sleep(0.12)  # a real stall of the event loop, not a simulated one
            await asyncio.sleep(0.08)

    staller = asyncio.create_task(stall())
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while sink.stats().json()["quality"]["fps"] == 25:
            assert asyncio.get_running_loop().time() < deadline, "never adapted"
            await asyncio.sleep(0.2)
    finally:
        staller.cancel()
        await asyncio.gather(staller, return_exceptions=True)
    assert node.engine.load >= 0.85
    q = sink.stats().json()["quality"]
    assert q["limited_by"] == "cpu" and q["score"] < 1.0
    async with http.get(f"{node.url}/api/sessions/{s['session_id']}") as r:
        body = await r.json()
    assert body["stats"]["sink"]["quality"]["fps"] < 25
    async with http.get(f"{node.url}/metrics") as r:
        text = await r.text()
    score = float(next(ln.split()[1] for ln in text.splitlines()
                       if ln.startswith("video_quality_score ")))
    assert score < 1.0
    # The warm encoder runs at the lower rate with no viewer at all.
    assert sink.stats().json()["encoders"] == {"audio/opus": 1, "video/h264": 1}


async def test_a_refused_create_releases_what_its_provider_kept() -> None:
    """A sink that fails to start refuses the session, and what its provider kept for
    it (a LiveKit region slot, say) and the half-opened sink are released; the lesson
    can be created again."""
    released: list[str] = []
    closed: list[str] = []
    fail = [True]

    class FlakySink(NullSink):
        async def start(self) -> None:
            if fail[0]:
                raise SinkError("the disk is full")

        async def aclose(self) -> None:
            closed.append("sink")
            await super().aclose()

    class Provider(SinkFactory):
        async def release(self, session: StreamSession) -> None:
            released.append(session.lesson_id)

    avatar = default_avatar(128, 96, 25)

    async def load(on_quality: Callable[[float], None]) -> RenderSetup:
        return RenderSetup(IdleRenderer(), {"default": avatar})

    engine = Engine(engine_settings(Config()), Metrics(),
                    sinks={"null": Provider(lambda spec, sid: FlakySink())}, load=load)
    await engine.start()
    try:
        with pytest.raises(SinkError, match="disk is full"):
            await engine.create_session(SessionSpec(lesson_id="a"))
        assert released == ["a"] and closed == ["sink"]
        assert not engine.sessions and engine.find_lesson("a") is None
        fail[0] = False
        session, created = await engine.create_session(SessionSpec(lesson_id="a"))
        assert created and engine.find_lesson("a") is session
    finally:
        await engine.aclose()
    assert released == ["a", "a"]  # closing the node released the second one too
