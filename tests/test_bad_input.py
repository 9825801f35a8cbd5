"""Bad input, one test each: a clear 4xx or an ``error`` event, and nothing else changes.

Every test runs beside a *neighbour*: another session that is speaking through its own
WebSocket the whole time. After the bad input the neighbour must have kept playing: its
frames advanced, it never underran, and its utterance finished where it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from rapido.http.keys import UPLOADS, WS_SECRET
from rapido.http.tokens import mint_token
from rapido.http.uploads import UploadSlots
from rapido.node import Node
from tests.conftest import API_KEY, NodeFactory, create_session, speech, stretched_total
from tests.test_ws import CHUNK, next_event, send_jittered

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Neighbour:
    node: Node
    session_id: str
    task: asyncio.Task[dict[str, Any]]
    seconds: float

    async def check(self) -> None:
        """The neighbour's utterance played through, untouched by the bad input: all of
        it, to the sample, without an underrun. The one exception: the node and this
        test's client share one process and one event loop, and on a loaded 2-core CI
        machine the whole process can stall past the buffer's 96 ms start (seen once in 20
        CI runs, with the model missing deadlines meanwhile); the sender is then late
        by that much and one underrun follows. That is excused only when the neighbour's
        own frames show the stall (one left >= 100 ms late); the bad inputs here are
        refused at once and never stall the loop (test_abuse bounds that strictly)."""
        finished = await asyncio.wait_for(self.task, 30)
        assert finished["interrupted"] is False
        assert abs(finished["position_ms"] - self.seconds * 1000) <= 40
        s = self.node.engine.sessions[self.session_id]
        stalled = s.counters.max_lateness_s >= 0.1
        assert s.jb.stats.underruns == 0 or (stalled and s.jb.stats.underruns == 1), \
            (s.jb.stats, s.counters)
        # Every sample played; time-stretching's changes counted.
        assert s.jb.stats.emitted_samples == stretched_total(s.jb.stats)


@pytest.fixture
async def keyed_node(make_node: NodeFactory) -> Node:
    # Small limits, so a test can reach each of them with small bodies.
    return await make_node(api_key=API_KEY, max_ws_message_bytes=4096, max_body_bytes=64 * 1024,
                           max_queued_audio_s=2.0, max_concurrent_uploads=1)


@pytest.fixture
async def neighbour(keyed_node: Node, http: aiohttp.ClientSession
                    ) -> AsyncIterator[Neighbour]:
    async with speaking_neighbour(keyed_node, http, AUTH) as n:
        yield n


@contextlib.asynccontextmanager
async def speaking_neighbour(node: Node, http: aiohttp.ClientSession,
                             headers: dict[str, str]) -> AsyncIterator[Neighbour]:
    s = await create_session(http, node, "neighbour", headers=headers)
    seconds = 1.5

    async def speak() -> dict[str, Any]:
        async with http.ws_connect(s["ws_url"], headers=headers) as ws:
            await next_event(ws, "ready")
            await send_jittered(ws, speech(seconds), jitter_s=0.01)
            await ws.send_json({"type": "end"})
            return await next_event(ws, "playback_finished")

    n = Neighbour(node, s["session_id"], asyncio.create_task(speak()), seconds)
    await asyncio.sleep(0.2)  # it is mid-utterance when the bad input arrives
    try:
        yield n
    finally:
        n.task.cancel()


async def post(http: aiohttp.ClientSession, url: str, *, data: Any = None,
               json: Any = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=data, json=json,
                         headers=AUTH if headers is None else headers) as r:
        return r.status, await r.json()


def assert_error(status: int, body: dict[str, Any], want_status: int, code: str) -> None:
    assert status == want_status, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and len(body["message"]) > 10


# -- HTTP ---------------------------------------------------------------------------------


async def test_malformed_json(keyed_node: Node, http: aiohttp.ClientSession,
                              neighbour: Neighbour) -> None:
    status, body = await post(http, f"{keyed_node.url}/api/sessions", data=b'{"lesson_id": ',
                              headers={**AUTH, "Content-Type": "application/json"})
    assert_error(status, body, 400, "invalid_json")
    status, body = await post(http, f"{keyed_node.url}/api/sessions", json=["lesson_id"])
    assert_error(status, body, 400, "invalid_json")
    await neighbour.check()


@pytest.mark.parametrize(("payload", "code"), [
    ({}, "missing_lesson_id"),
    ({"lesson_id": ""}, "invalid_lesson_id"),
    ({"lesson_id": "has space"}, "invalid_lesson_id"),
    ({"lesson_id": "x" * 65}, "invalid_lesson_id"),
    ({"lesson_id": "../etc"}, "invalid_lesson_id"),
    ({"lesson_id": 42}, "invalid_lesson_id"),
    ({"lesson_id": "ok", "colour": "red"}, "unknown_field"),
    ({"lesson_id": "ok", "sink": "tape"}, "invalid_sink"),
    ({"lesson_id": "ok", "user_location": {"lat": 91, "lon": 0}}, "invalid_user_location"),
])
async def test_invalid_create_fields(keyed_node: Node, http: aiohttp.ClientSession,
                                     neighbour: Neighbour, payload: dict[str, Any],
                                     code: str) -> None:
    status, body = await post(http, f"{keyed_node.url}/api/sessions", json=payload)
    assert_error(status, body, 400, code)
    assert set(keyed_node.engine.sessions) == {neighbour.session_id}
    await neighbour.check()


@pytest.mark.parametrize("rate", [7999, 48001, 0, -16000, 16000.5, "16000", True])
async def test_sample_rate_out_of_range(keyed_node: Node, http: aiohttp.ClientSession,
                                        neighbour: Neighbour, rate: Any) -> None:
    status, body = await post(http, f"{keyed_node.url}/api/sessions",
                              json={"lesson_id": "rate", "sample_rate": rate})
    assert_error(status, body, 400, "invalid_sample_rate")
    assert "8000" in body["message"] and "48000" in body["message"]
    await neighbour.check()


async def test_unknown_session(keyed_node: Node, http: aiohttp.ClientSession,
                               neighbour: Neighbour) -> None:
    url = keyed_node.url
    for method, path in (("GET", "/api/sessions/nope"), ("DELETE", "/api/sessions/nope"),
                         ("POST", "/api/sessions/nope/interrupt"),
                         ("POST", "/api/sessions/nope/audio")):
        async with http.request(method, url + path, headers=AUTH, data=b"x") as r:
            assert_error(r.status, await r.json(), 404, "session_not_found")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{url}/ws/sessions/nope", headers=AUTH)
    assert info.value.status == 404
    await neighbour.check()


async def test_wrong_or_missing_api_key(keyed_node: Node, http: aiohttp.ClientSession,
                                        neighbour: Neighbour) -> None:
    url = f"{keyed_node.url}/api/sessions"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer"}):
        status, body = await post(http, url, json={"lesson_id": "intruder"}, headers=headers)
        assert_error(status, body, 401, "unauthorized")
    async with http.delete(f"{url}/{neighbour.session_id}") as r:
        assert r.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{keyed_node.url}/ws/sessions/{neighbour.session_id}",
                              headers={"Authorization": "Bearer nope"})
    assert info.value.status == 401
    assert set(keyed_node.engine.sessions) == {neighbour.session_id}
    await neighbour.check()


def _wav(tag: int, bits: int, channels: int = 1, rate: int = 16000,
         payload: bytes = b"\x00" * 320) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8,
                      channels * bits // 8, bits)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(payload)) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(payload)) + payload)


@pytest.mark.parametrize(("wav", "status", "code"), [
    (_wav(tag=7, bits=8), 415, "unsupported_wav"),  # mu-law
    (_wav(tag=2, bits=4), 415, "unsupported_wav"),  # MS ADPCM
    (_wav(tag=1, bits=12), 415, "unsupported_wav"),
    (_wav(tag=1, bits=16, channels=9), 415, "unsupported_wav"),
    (_wav(tag=1, bits=16, rate=96000), 400, "invalid_sample_rate"),
    (b"RIFF\x00\x00\x00\x00WAVEjunk", 400, "invalid_wav"),
    (b"ID3\x03 not a wav at all", 400, "invalid_wav"),
])
async def test_unsupported_wav(keyed_node: Node, http: aiohttp.ClientSession,
                               neighbour: Neighbour, wav: bytes, status: int,
                               code: str) -> None:
    url = f"{keyed_node.url}/api/sessions/{neighbour.session_id}/audio"
    got, body = await post(http, url, data=wav, headers={**AUTH, "Content-Type": "audio/wav"})
    assert_error(got, body, status, code)
    await neighbour.check()


async def test_unsupported_content_type_and_odd_l16(
        keyed_node: Node, http: aiohttp.ClientSession, neighbour: Neighbour) -> None:
    url = f"{keyed_node.url}/api/sessions/{neighbour.session_id}/audio"
    got, body = await post(http, url, data=b"abc", headers={**AUTH, "Content-Type": "audio/mpeg"})
    assert_error(got, body, 415, "unsupported_media_type")
    got, body = await post(http, url, data=b"abc",
                           headers={**AUTH, "Content-Type": "audio/L16;rate=16000"})
    assert_error(got, body, 400, "odd_length_pcm")
    got, body = await post(http, url, data=b"abcd", headers={**AUTH, "Content-Type": "audio/L16"})
    assert_error(got, body, 400, "invalid_content_type")
    await neighbour.check()


async def test_oversize_body(keyed_node: Node, http: aiohttp.ClientSession,
                             neighbour: Neighbour) -> None:
    url = f"{keyed_node.url}/api/sessions/{neighbour.session_id}/audio"
    big = b"\x00\x00" * (64 * 1024)
    got, body = await post(http, url, data=big,
                           headers={**AUTH, "Content-Type": "audio/L16;rate=16000"})
    assert_error(got, body, 413, "body_too_large")
    await neighbour.check()


def _float_wav(seconds: float, value: float, rate: int = 8000) -> bytes:
    n = int(seconds * rate)
    return _wav(tag=3, bits=32, rate=rate, payload=struct.pack(f"<{n}f", *([value] * n)))


async def test_upload_beyond_the_queue_is_refused_from_its_header(
        keyed_node: Node, http: aiohttp.ClientSession, neighbour: Neighbour) -> None:
    """The header's length against what is left of the queue (2 s here), before anything
    is decoded: a float WAV full of NaN gets 429 queue_full, not 400 invalid_wav."""
    s = await create_session(http, keyed_node, "queued", headers=AUTH)
    url = f"{keyed_node.url}/api/sessions/{s['session_id']}/audio"
    wav = {**AUTH, "Content-Type": "audio/wav"}
    got, body = await post(http, url, data=_float_wav(1.5, 0.1), headers=wav)
    assert got == 202 and body["queued_ms"] == 1500.0, body
    async with http.post(url, data=_float_wav(1.0, float("nan")), headers=wav) as r:
        assert_error(r.status, await r.json(), 429, "queue_full")
        assert int(r.headers["Retry-After"]) > 0
    l16 = {**AUTH, "Content-Type": "audio/L16;rate=8000"}
    async with http.post(url, data=b"\x00\x00" * 8000, headers=l16) as r:  # 1 s
        assert_error(r.status, await r.json(), 429, "queue_full")
        assert int(r.headers["Retry-After"]) > 0
    # What still fits is taken; a NaN within it is found once the header passed.
    got, body = await post(http, url, data=_float_wav(0.25, float("nan")), headers=wav)
    assert_error(got, body, 400, "invalid_wav")
    got, body = await post(http, url, data=_float_wav(0.5, 0.1), headers=wav)
    assert got == 202 and body["queued_ms"] == 2000.0, body
    assert keyed_node.engine.sessions[s["session_id"]].stats()["queued_ms"] == 2000.0
    await neighbour.check()


async def test_uploads_beyond_max_concurrent_uploads_are_refused_unread(
        keyed_node: Node, http: aiohttp.ClientSession, neighbour: Neighbour) -> None:
    """One upload in progress (max_concurrent_uploads = 1 here): another gets 429
    too_many_uploads + Retry-After before its body is read; the first one completes."""
    s = await create_session(http, keyed_node, "uploads", headers=AUTH)
    url = f"{keyed_node.url}/api/sessions/{s['session_id']}/audio"
    headers = {**AUTH, "Content-Type": "audio/L16;rate=16000"}
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"\x00\x00" * 1600
        await release.wait()
        yield b"\x00\x00" * 1600

    first = asyncio.create_task(post(http, url, data=slow_body(), headers=headers))
    slots = keyed_node.app[UPLOADS]
    for _ in range(100):
        if slots.in_use:
            break
        await asyncio.sleep(0.02)
    assert slots.in_use == 1
    async with http.post(url, data=b"\x00\x00" * 1600, headers=headers) as r:
        assert_error(r.status, await r.json(), 429, "too_many_uploads")
        assert int(r.headers["Retry-After"]) > 0
    release.set()
    got, body = await first
    assert got == 202 and body["duration_ms"] == 200.0, body
    assert slots.in_use == 0
    got, body = await post(http, url, data=b"\x00\x00" * 1600, headers=headers)
    assert got == 202, body
    await neighbour.check()


def test_upload_slots() -> None:
    slots = UploadSlots(2)
    assert slots.try_take() and slots.try_take() and not slots.try_take()
    slots.release()
    assert slots.in_use == 1 and slots.try_take()
    with pytest.raises(ValueError):
        UploadSlots(0)


# -- WebSocket ------------------------------------------------------------------------


@pytest.fixture
async def victim_ws(keyed_node: Node, http: aiohttp.ClientSession
                    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    s = await create_session(http, keyed_node, "victim", headers=AUTH)
    async with http.ws_connect(s["ws_url"], headers=AUTH) as ws:
        await next_event(ws, "ready")
        yield ws


async def _still_works(ws: aiohttp.ClientWebSocketResponse) -> None:
    """After an error event the same connection still takes speech and control."""
    audio = speech(0.2)
    for start in range(0, len(audio), CHUNK):
        await ws.send_bytes(audio[start : start + CHUNK].tobytes())
    await ws.send_json({"type": "end"})
    finished = await next_event(ws, "playback_finished")
    assert abs(finished["position_ms"] - 200) <= 40


async def test_ws_odd_length_pcm(victim_ws: aiohttp.ClientWebSocketResponse,
                                 neighbour: Neighbour) -> None:
    await victim_ws.send_bytes(b"\x01\x02\x03")
    err = await next_event(victim_ws, "error")
    assert err["code"] == "odd_length_pcm" and "even" in err["message"]
    await _still_works(victim_ws)
    await neighbour.check()


async def test_ws_text_not_json(victim_ws: aiohttp.ClientWebSocketResponse,
                                neighbour: Neighbour) -> None:
    await victim_ws.send_str("hello there")
    err = await next_event(victim_ws, "error")
    assert err["code"] == "invalid_json"
    await victim_ws.send_str('["end"]')
    assert (await next_event(victim_ws, "error"))["code"] == "invalid_message"
    await victim_ws.send_str('{"type": "dance"}')
    err = await next_event(victim_ws, "error")
    assert err["code"] == "unknown_type" and "dance" in err["message"]
    await _still_works(victim_ws)
    await neighbour.check()


async def test_ws_oversize_message(victim_ws: aiohttp.ClientWebSocketResponse,
                                   neighbour: Neighbour) -> None:
    await victim_ws.send_bytes(b"\x00" * 6000)  # over the 4096-byte limit
    err = await next_event(victim_ws, "error")
    assert err["code"] == "message_too_large" and "4096" in err["message"]
    await victim_ws.send_str('{"type": "ping", "pad": "' + "x" * 5000 + '"}')
    assert (await next_event(victim_ws, "error"))["code"] == "message_too_large"
    await _still_works(victim_ws)
    await neighbour.check()


async def test_ws_far_oversize_message_closes_only_that_socket(
        victim_ws: aiohttp.ClientWebSocketResponse, neighbour: Neighbour) -> None:
    await victim_ws.send_bytes(b"\x00" * 20000)  # beyond what the server will even read
    msg = await victim_ws.receive(timeout=5)
    while msg.type == aiohttp.WSMsgType.TEXT:
        msg = await victim_ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert victim_ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await neighbour.check()


async def test_audio_after_chunk_boundaries_is_exact(keyed_node: Node,
                                                     victim_ws: aiohttp.ClientWebSocketResponse
                                                     ) -> None:
    """Odd chunk sizes (in samples) are fine; only odd byte counts are refused."""
    audio = speech(0.5)
    for start in range(0, len(audio), CHUNK + 1):
        await victim_ws.send_bytes(audio[start : start + CHUNK + 1].tobytes())
    await victim_ws.send_json({"type": "end"})
    finished = await next_event(victim_ws, "playback_finished")
    assert abs(finished["position_ms"] - 500.0) <= 1.0


# -- WebSocket tokens (a node with a key) -----------------------------------------------


async def _ws_refused(http: aiohttp.ClientSession, url: str,
                      headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The handshake is refused with 401; the same request as plain GET shows why."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(url, headers=headers)
    assert info.value.status == 401
    async with http.get(url, headers=headers) as r:
        body: dict[str, Any] = await r.json()
        assert_error(r.status, body, 401, "unauthorized")
        return body


async def test_ws_tokens_are_scoped_to_their_session_and_expire(
        keyed_node: Node, http: aiohttp.ClientSession, neighbour: Neighbour) -> None:
    a = await create_session(http, keyed_node, "tok-a", headers=AUTH)
    b = await create_session(http, keyed_node, "tok-b", headers=AUTH, sink="webrtc")
    assert a["ws_token"] and API_KEY not in a["ws_url"] + a["ws_token"]
    # A's token opens A's socket, in the URL (browsers) or as a Bearer header.
    async with http.ws_connect(f"{a['ws_url']}?token={a['ws_token']}") as ws:
        assert (await ws.receive_json())["type"] == "ready"
    async with http.ws_connect(a["ws_url"],
                               headers={"Authorization": f"Bearer {a['ws_token']}"}) as ws:
        assert (await ws.receive_json())["type"] == "ready"
    # ... and no other: not B's, not the neighbour's.
    for other in (b["ws_url"], f"{keyed_node.url}/ws/sessions/{neighbour.session_id}"):
        body = await _ws_refused(http, f"{other}?token={a['ws_token']}")
        assert "wrong WebSocket token for this session" in body["message"]
    # An expired one.
    expired = mint_token(keyed_node.app[WS_SECRET], a["session_id"], -60)
    body = await _ws_refused(http, f"{a['ws_url']}?token={expired}")
    assert "expired" in body["message"]
    # A viewer token is not a WebSocket token (secrets derived apart), nor is it the key.
    await _ws_refused(http, f"{b['ws_url']}?token={b['viewer_token']}")
    expiry = int(b["viewer_token"].split(".")[0])
    assert mint_token(keyed_node.app[WS_SECRET], b["session_id"], 0, now=expiry) \
        != b["viewer_token"]
    # The key never goes into a URL any more; nor is a token an API key.
    body = await _ws_refused(http, f"{a['ws_url']}?access_token={API_KEY}")
    assert "no longer accepted" in body["message"]
    await _ws_refused(http, f"{a['ws_url']}?token={API_KEY}x")
    async with http.get(f"{keyed_node.url}/api/sessions",
                        headers={"Authorization": f"Bearer {a['ws_token']}"}) as r:
        assert_error(r.status, await r.json(), 401, "unauthorized")
    await neighbour.check()


# -- keyless loopback mode: DNS rebinding, cross-site requests ---------------------------


@pytest.fixture
async def keyless_neighbour(make_node: NodeFactory, http: aiohttp.ClientSession
                            ) -> AsyncIterator[Neighbour]:
    node = await make_node()
    async with speaking_neighbour(node, http, {}) as n:
        yield n


async def test_keyless_refuses_foreign_hosts(http: aiohttp.ClientSession,
                                             keyless_neighbour: Neighbour) -> None:
    node = keyless_neighbour.node
    port = node.port
    url = f"{node.url}/api/sessions"
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}",
                 f"10.0.0.1:{port}", f"localhost.evil.example:{port}"):
        async with http.get(url, headers={"Host": host}) as r:
            body = await r.json()
        assert_error(r.status, body, 403, "forbidden_host")
        assert "DNS rebinding" in body["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{node.url}/ws/sessions/{keyless_neighbour.session_id}",
                              headers={"Host": f"evil.example:{port}"})
    assert info.value.status == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"app.localhost:{port}"):
        async with http.get(url, headers={"Host": host}) as r:
            assert r.status == 200, host
    await keyless_neighbour.check()


async def test_keyless_refuses_cross_site_requests(http: aiohttp.ClientSession,
                                                   keyless_neighbour: Neighbour) -> None:
    node = keyless_neighbour.node
    sid = keyless_neighbour.session_id
    evil = {"Origin": "https://evil.example"}
    for method, path in (("POST", "/api/sessions"), ("POST", "/api/demo"),
                         ("POST", f"/api/sessions/{sid}/interrupt"),
                         ("DELETE", f"/api/sessions/{sid}")):
        async with http.request(method, node.url + path, headers=evil,
                                json={"lesson_id": "csrf"}) as r:
            body = await r.json()
        assert_error(r.status, body, 403, "forbidden_origin")
        assert "cross-site" in body["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(f"{node.url}/ws/sessions/{sid}", origin="https://evil.example")
    assert info.value.status == 403
    # A JSON body must say so: a cross-site form can send text/plain, not JSON.
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": ctype} if ctype else {}
        async with http.post(f"{node.url}/api/sessions", data=b'{"lesson_id": "csrf"}',
                             headers=headers, skip_auto_headers=["Content-Type"]) as r:
            assert_error(r.status, await r.json(), 415, "unsupported_media_type")
    assert set(node.engine.sessions) == {sid}
    # The node's own page (its origin) may.
    async with http.post(f"{node.url}/api/sessions", json={"lesson_id": "own"},
                         headers={"Origin": node.url}) as r:
        assert r.status == 201, await r.text()
    await keyless_neighbour.check()
