"""LiveKit sessions through the API: region choice, tokens, and an unreachable server
that degrades one session while the others play on."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import jwt

from rapido.livekit.publisher import LiveKitPublisher
from rapido.livekit.sink import LiveKitSink
from tests.conftest import NodeFactory, create_session, speech
from tests.test_ws import next_event, send_jittered

KEY, SECRET = "devkey", "devsecret-that-is-long-enough-for-hs256"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when we return


async def test_unreachable_livekit_degrades_only_that_session(
        make_node: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    regions = tmp_path / "regions.toml"
    regions.write_text(f"""
[[regions]]
name = "eu"
url = "ws://127.0.0.1:{closed_port()}"
capacity = 10
location = [50.1, 8.7]

[[regions]]
name = "us"
url = "ws://127.0.0.1:{closed_port()}"
capacity = 10
location = [39.0, -77.5]
""")
    node = await make_node(model="none", livekit_api_key=KEY, livekit_api_secret=SECRET,
                           livekit_regions_file=str(regions))
    lk = await create_session(http, node, "lk", sink="livekit",
                              user_location={"lat": 48.8, "lon": 2.3})  # Paris
    assert lk["region"] == "eu" and lk["room_name"] == "lesson_lk"
    claims = jwt.decode(lk["viewer_token"], SECRET, algorithms=["HS256"])
    assert claims["video"]["room"] == "lesson_lk"
    assert claims["video"].get("canPublish") is False and claims["video"]["canSubscribe"]
    us = await create_session(http, node, "lk-us", sink="livekit",
                              user_location={"lat": 40.7, "lon": -74.0})  # New York
    assert us["region"] == "us"

    other = await create_session(http, node, "plain")
    for _ in range(100):
        async with http.get(f"{node.url}/api/sessions/{lk['session_id']}") as r:
            sink = (await r.json())["stats"]["sink"]
        if sink["state"] == "degraded" and sink["retries"] >= 1:
            break
        await asyncio.sleep(0.05)
    assert sink["state"] == "degraded" and sink["reason"]
    # The other session plays an utterance to its end, untouched.
    async with http.ws_connect(other["ws_url"]) as ws:
        await next_event(ws, "ready")
        await send_jittered(ws, speech(0.6), jitter_s=0.0)
        await ws.send_json({"type": "end"})
        finished = await next_event(ws, "playback_finished")
    assert abs(finished["position_ms"] - 600) <= 40
    # The degraded stream goes on producing frames, and the metric counts the fault.
    s = node.engine.sessions[lk["session_id"]]
    before = s.counters.frames_out
    await asyncio.sleep(0.3)
    assert s.counters.frames_out > before
    async with http.get(f"{node.url}/metrics") as r:
        assert 'session_errors_total{kind="livekit_degraded"}' in await r.text()


async def test_livekit_without_credentials_is_refused(make_node: NodeFactory,
                                                      http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none")
    async with http.post(f"{node.url}/api/sessions",
                         json={"lesson_id": "nokey", "sink": "livekit"}) as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"] == "sink_unavailable" and "LiveKit" in body["message"]
    assert not node.engine.sessions


async def test_agent_avatar_session_through_the_api(make_node: NodeFactory, tmp_path: Path,
                                                    http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none", livekit_api_key=KEY, livekit_api_secret=SECRET,
                           livekit_url=f"ws://127.0.0.1:{closed_port()}")
    s = await create_session(http, node, "agentic", agent_identity="agent-7",
                             room="tutor-room-1")
    assert s["sink"] == "livekit" and s["agent_identity"] == "agent-7"
    assert s["room_name"] == "tutor-room-1"
    sink = node.engine.sessions[s["session_id"]].sink
    assert isinstance(sink, LiveKitSink)
    assert sink._token_factory is not None
    claims = jwt.decode(sink._token_factory(), SECRET, algorithms=["HS256"])
    assert claims["video"]["room"] == "tutor-room-1" and claims["video"]["canPublish"]
    assert claims.get("kind") == "agent"
    assert claims["attributes"]["lk.publish_on_behalf"] == "agent-7"
    assert sink.on_room is not None  # the agent protocol is served in each room it joins
    for body, code in (({"lesson_id": "x", "agent_identity": "has space"},
                        "invalid_agent_identity"),
                       ({"lesson_id": "x", "agent_identity": "a", "sink": "webrtc"},
                        "invalid_sink")):
        async with http.post(f"{node.url}/api/sessions", json=body) as r:
            assert r.status == 400 and (await r.json())["error"] == code
    async with http.delete(f"{node.url}/api/sessions/{s['session_id']}") as r:
        assert r.status == 200
    publisher = node.engine.provider("livekit")
    assert isinstance(publisher, LiveKitPublisher) and publisher.bridges == 0
