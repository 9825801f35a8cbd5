"""The REST API through a real server on loopback."""

from __future__ import annotations

import asyncio
import io
import time
import wave

import aiohttp
import numpy as np
import pytest

from rapido.node import Node
from tests.conftest import API_KEY, NodeFactory, create_session, speech


def wav_bytes(samples: np.ndarray, rate: int, *, width: int = 2, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


async def test_create_get_list_delete(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{node.url}/api/sessions",
                         json={"lesson_id": "math-101", "user_id": "u1",
                               "user_location": {"lat": 52.5, "lon": 13.4}}) as r:
        assert r.status == 201
        s = await r.json()
        assert r.headers["Location"] == f"/api/sessions/{s['session_id']}"
    assert s["lesson_id"] == "math-101"
    assert s["room_name"] == "lesson_math-101"
    assert s["state"] == "idle"
    assert s["node"] == node.engine.node_id
    assert s["ws_url"] == f"ws://127.0.0.1:{node.port}/ws/sessions/{s['session_id']}"
    assert s["user_location"] == {"lat": 52.5, "lon": 13.4}
    assert s["created_at"].endswith("Z")

    # Idempotent per lesson: the same lesson gets the same session back, with 200.
    async with http.post(f"{node.url}/api/sessions", json={"lesson_id": "math-101"}) as r:
        assert r.status == 200
        assert (await r.json())["session_id"] == s["session_id"]

    other = await create_session(http, node, "bio-7")
    async with http.get(f"{node.url}/api/sessions") as r:
        ids = {x["session_id"] for x in (await r.json())["sessions"]}
    assert ids == {s["session_id"], other["session_id"]}

    # The clock runs: idle frames flow while silent (polled: a slow spell of the
    # machine must not read as a stopped clock).
    deadline = time.monotonic() + 10.0
    while True:
        async with http.get(f"{node.url}/api/sessions/{s['session_id']}") as r:
            stats = (await r.json())["stats"]
        if stats["frames_out"] >= 5 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert stats["frames_out"] >= 5
    for key in ("buffered_ms", "underruns", "frames_out", "playout_position_ms"):
        assert key in stats

    async with http.delete(f"{node.url}/api/sessions/{s['session_id']}") as r:
        assert r.status == 200
        assert (await r.json())["state"] == "closed"
    async with http.get(f"{node.url}/api/sessions/{s['session_id']}") as r:
        assert r.status == 404
        assert (await r.json())["error"] == "session_not_found"
    # Once closed, the lesson can start a fresh session.
    again = await create_session(http, node, "math-101")
    assert again["session_id"] != s["session_id"]


async def test_concurrent_creates_of_one_lesson_make_one_session(
        node: Node, http: aiohttp.ClientSession) -> None:
    async def post() -> tuple[int, str]:
        async with http.post(f"{node.url}/api/sessions", json={"lesson_id": "race"}) as r:
            return r.status, (await r.json())["session_id"]

    results = await asyncio.gather(*(post() for _ in range(8)))
    assert len({sid for _, sid in results}) == 1
    assert sorted(status for status, _ in results) == [200] * 7 + [201]
    assert len(node.engine.sessions) == 1


async def test_admission_control_503_with_retry_after(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await make_node(max_streams=2)
    await create_session(http, node, "a")
    await create_session(http, node, "b")
    async with http.post(f"{node.url}/api/sessions", json={"lesson_id": "c"}) as r:
        assert r.status == 503
        assert int(r.headers["Retry-After"]) > 0
        body = await r.json()
    assert body["error"] == "at_capacity"
    assert "2" in body["message"]
    # An existing lesson is still answered at capacity: that is not a new stream.
    async with http.post(f"{node.url}/api/sessions", json={"lesson_id": "a"}) as r:
        assert r.status == 200


async def test_upload_wav_plays_and_interrupt(node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "upload")
    sid = s["session_id"]
    audio = speech(2.0, rate=22_050)
    async with http.post(f"{node.url}/api/sessions/{sid}/audio",
                         data=wav_bytes(audio, 22_050),
                         headers={"Content-Type": "audio/wav"}) as r:
        assert r.status == 202, await r.text()
        body = await r.json()
    assert body["input_sample_rate"] == 22_050
    assert abs(body["duration_ms"] - 2000) < 5
    session = node.engine.sessions[sid]
    for _ in range(50):
        if session.state == "speaking":
            break
        await asyncio.sleep(0.02)
    assert session.state == "speaking"
    await asyncio.sleep(0.3)
    async with http.post(f"{node.url}/api/sessions/{sid}/interrupt") as r:
        assert r.status == 200
        result = await r.json()
    assert result["interrupted"] is True
    assert 100 < result["position_ms"] < 1500
    assert session.state == "interrupted"
    assert session.jb.buffered_samples == 0
    assert session.stats()["queued_ms"] == 0


async def test_upload_l16_big_endian(node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "l16")
    audio = speech(0.5, rate=16_000)
    async with http.post(f"{node.url}/api/sessions/{s['session_id']}/audio",
                         data=audio.astype(">i2").tobytes(),
                         headers={"Content-Type": "audio/L16;rate=16000"}) as r:
        assert r.status == 202
        assert abs((await r.json())["duration_ms"] - 500) < 5


async def test_queue_limit_gives_429(make_node: NodeFactory,
                                     http: aiohttp.ClientSession) -> None:
    # 2.5 s + 2.5 s over a 3 s queue: the first would have to play 2 s before the second
    # arrives to make room for it (0.8 s over 1 s, once: 0.6 s, a slow spell's length).
    node = await make_node(max_queued_audio_s=3.0)
    s = await create_session(http, node, "q")
    url = f"{node.url}/api/sessions/{s['session_id']}/audio"
    body = wav_bytes(speech(2.5), 16_000)
    async with http.post(url, data=body, headers={"Content-Type": "audio/wav"}) as r:
        assert r.status == 202
    async with http.post(url, data=body, headers={"Content-Type": "audio/wav"}) as r:
        assert r.status == 429
        assert (await r.json())["error"] == "queue_full"


async def test_health_ready_metrics_openapi(node: Node, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{node.url}/health") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get(f"{node.url}/ready") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    await create_session(http, node, "m")
    async with http.get(f"{node.url}/api/sessions/nope") as r:
        assert r.status == 404
    async with http.get(f"{node.url}/metrics") as r:
        text = await r.text()
    for name in ("concurrent_streams_total 1.0", "audio_buffer_underruns_total",
                 "frame_processing_latency_seconds_bucket", "gpu_utilization_percent",
                 "gpu_memory_used_bytes", "livekit_connection_seconds", "video_quality_score",
                 'http_requests_total{method="POST",route="/api/sessions",status="201"}',
                 'http_requests_total{method="GET",route="/api/sessions/{session_id}",'
                 'status="404"}',
                 "http_request_duration_seconds_bucket"):
        assert name in text, name
    async with http.get(f"{node.url}/api/openapi.json") as r:
        doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    for path in ("/api/sessions", "/api/sessions/{session_id}", "/api/sessions/{session_id}/audio",
                 "/api/sessions/{session_id}/interrupt", "/ws/sessions/{session_id}", "/health",
                 "/ready", "/metrics"):
        assert path in doc["paths"], path
    async with http.get(f"{node.url}/") as r:
        assert r.status == 200 and "rapido" in await r.text()


# -- auth -------------------------------------------------------------------------------


async def test_api_key_required_when_configured(make_node: NodeFactory,
                                                http: aiohttp.ClientSession) -> None:
    node = await make_node(api_key=API_KEY)
    url = f"{node.url}/api/sessions"
    async with http.get(url) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["error"] == "unauthorized"
    async with http.get(url, headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
        assert "wrong" in (await r.json())["message"]
    async with http.get(url, headers={"Authorization": f"Basic {API_KEY}"}) as r:
        assert r.status == 401
    async with http.get(url, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 200


async def test_ws_auth(make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await make_node(api_key=API_KEY)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    s = await create_session(http, node, "wsauth", headers=auth)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{node.url}/ws/sessions/{s['session_id']}")
    assert info.value.status == 401
    async with http.ws_connect(f"{node.url}/ws/sessions/{s['session_id']}",
                               headers=auth) as ws:
        assert (await ws.receive_json())["type"] == "ready"
    # A browser: the session's own short-lived token, never the key, in the URL.
    async with http.ws_connect(f"{s['ws_url']}?token={s['ws_token']}") as ws:
        assert (await ws.receive_json())["type"] == "ready"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(
            f"{node.url}/ws/sessions/{s['session_id']}?access_token={API_KEY}")
    assert info.value.status == 401
    # Health, readiness and metrics stay open for probes and scrapers.
    for path in ("/health", "/ready", "/metrics"):
        async with http.get(f"{node.url}{path}") as r:
            assert r.status == 200


async def test_ready_shows_paths_only_to_the_key(make_node: NodeFactory,
                                                 http: aiohttp.ClientSession) -> None:
    node = await make_node(api_key=API_KEY)
    model_dir = node.config.model_dir
    async with http.get(f"{node.url}/ready") as r:
        assert r.status == 200
        anonymous = await r.text()
    async with http.get(f"{node.url}/ready",
                        headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        keyed = await r.text()
    assert model_dir in keyed  # the model file's path, for the operator
    assert model_dir not in anonymous and '"/' not in anonymous
    assert '.../' in anonymous  # the file name stays: which model is running
    # Keyless: nobody presents the key, so nobody sees paths.
    keyless = await make_node()
    async with http.get(f"{keyless.url}/ready") as r:
        assert model_dir not in await r.text()
