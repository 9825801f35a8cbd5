"""The WebSocket stream through a real server: speech in, events out, back-pressure."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import numpy as np
import orjson

from rapido.http.ws import ErrorReply, Outgoing, Pong, Ready, event_json
from rapido.node import Node
from rapido.pipeline.events import (
    Closed,
    PlaybackFinished,
    PlaybackStarted,
    Refill,
    Underrun,
)
from tests.conftest import NodeFactory, create_session, speech, stretched_total

CHUNK = 320  # 20 ms at 16 kHz


async def next_event(ws: aiohttp.ClientWebSocketResponse, kind: str,
                     timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive_json(timeout=max(0.01, deadline - time.monotonic()))
        if msg["type"] == kind:
            return msg


async def send_jittered(ws: aiohttp.ClientWebSocketResponse, audio: np.ndarray,
                        jitter_s: float = 0.03, seed: int = 1) -> None:
    """20 ms chunks on a real-time schedule, each one late by a random amount, in order."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    last = t0
    for i, start in enumerate(range(0, len(audio), CHUNK)):
        due = max(last, t0 + (i + 1) * 0.02 + rng.uniform(0, jitter_s))
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        last = due
        await ws.send_bytes(audio[start : start + CHUNK].tobytes())


async def test_stream_with_jitter_plays_to_the_right_position(
        node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "ws-play", sample_rate=16_000)
    async with http.ws_connect(s["ws_url"]) as ws:
        ready = await next_event(ws, "ready")
        assert ready["session_id"] == s["session_id"] and ready["sample_rate"] == 16_000
        audio = speech(2.0)
        await ws.send_json({"type": "start"})
        sender = asyncio.create_task(send_jittered(ws, audio))
        started = await next_event(ws, "playback_started")
        t_start = time.monotonic()
        await sender
        await ws.send_json({"type": "end"})
        finished = await next_event(ws, "playback_finished")
        elapsed = time.monotonic() - t_start
        assert finished["utterance"] == started["utterance"]
        assert finished["interrupted"] is False
        assert abs(finished["position_ms"] - 2000.0) <= 40.0
        # Played at real time, not faster: the audio clock paces it (what it played,
        # less one frame at each end: time-stretching may have taken a little out).
        played_s = node.engine.sessions[s["session_id"]].jb.stats.emitted_samples / 48_000
        assert elapsed >= played_s - 0.1, (elapsed, played_s)
        await ws.send_json({"type": "ping", "id": 7})
        assert (await next_event(ws, "pong"))["id"] == 7
    session = node.engine.sessions[s["session_id"]]
    assert session.jb.stats.underruns == 0
    assert session.jb.stats.emitted_samples == stretched_total(session.jb.stats)


async def test_interrupt_mid_utterance(node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "ws-int")
    session = node.engine.sessions[s["session_id"]]
    async with http.ws_connect(s["ws_url"]) as ws:
        await next_event(ws, "ready")
        sender = asyncio.create_task(send_jittered(ws, speech(4.0), jitter_s=0.0))
        await next_event(ws, "playback_started")
        await asyncio.sleep(0.6)
        await ws.send_json({"type": "interrupt"})
        finished = await next_event(ws, "playback_finished")
        speaking_at_stop = session.counters.speaking_frames
        assert finished["interrupted"] is True
        assert finished["reason"] == "interrupt"
        assert 300.0 <= finished["position_ms"] <= 1500.0
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await asyncio.sleep(0.3)
    # Within one frame: the frame after the interrupt was already silent, and no speech
    # reached the sink since.
    assert session.counters.speaking_frames == speaking_at_stop
    assert session.state == "interrupted"
    assert session.jb.stats.flushed_samples > 0


async def test_fast_sender_is_slowed_not_dropped(make_node: NodeFactory,
                                                 http: aiohttp.ClientSession) -> None:
    node = await make_node()
    s = await create_session(http, node, "ws-fast", sample_rate=16_000)
    session = node.engine.sessions[s["session_id"]]
    max_ms = node.config.jitter_max_ms
    audio = speech(2.5)
    peak = 0.0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, session.jb.buffered_ms)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    async with http.ws_connect(s["ws_url"]) as ws:
        await next_event(ws, "ready")
        for start in range(0, len(audio), CHUNK):  # as fast as the socket takes it
            await ws.send_bytes(audio[start : start + CHUNK].tobytes())
        await ws.send_json({"type": "end"})
        finished = await next_event(ws, "playback_finished")
    watcher.cancel()
    assert abs(finished["position_ms"] - 2500.0) <= 40.0
    # The buffer never held more than its maximum plus one message: the rest waited in
    # the socket, because the server stopped reading.
    assert peak <= max_ms + 20.0 + 1.0
    assert session.jb.stats.emitted_samples == stretched_total(session.jb.stats)
    assert session.jb.stats.flushed_samples == 0


async def test_resampling_keeps_duration(node: Node, http: aiohttp.ClientSession) -> None:
    for rate in (8_000, 44_100):
        s = await create_session(http, node, f"rate{rate}", sample_rate=rate)
        async with http.ws_connect(s["ws_url"]) as ws:
            await next_event(ws, "ready")
            audio = speech(0.7, rate=rate)
            step = rate // 50
            for start in range(0, len(audio), step):
                await ws.send_bytes(audio[start : start + step].tobytes())
            await ws.send_json({"type": "end"})
            finished = await next_event(ws, "playback_finished")
        assert abs(finished["position_ms"] - 700.0) <= 1.0, rate


async def test_session_delete_closes_socket(node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "ws-del")
    async with http.ws_connect(s["ws_url"]) as ws:
        await next_event(ws, "ready")
        async with http.delete(f"{node.url}/api/sessions/{s['session_id']}") as r:
            assert r.status == 200
        closed = await next_event(ws, "closed")
        assert closed["reason"] == "deleted"
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_errors_and_pongs_go_only_to_their_own_connection(
        node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "two-clients")
    async with http.ws_connect(s["ws_url"]) as a, http.ws_connect(s["ws_url"]) as b:
        await next_event(a, "ready")
        await next_event(b, "ready")
        await a.send_str("not json")
        await a.send_json({"type": "ping", "id": "a1"})
        assert (await next_event(a, "error"))["code"] == "invalid_json"
        assert (await next_event(a, "pong"))["id"] == "a1"
        # b sees the session's events (playback) but not a's error, pong or ready.
        audio = speech(0.3)
        for start in range(0, len(audio), CHUNK):
            await a.send_bytes(audio[start : start + CHUNK].tobytes())
        await a.send_json({"type": "end"})
        seen = []
        while True:
            msg = await b.receive_json(timeout=10)
            seen.append(msg["type"])
            if msg["type"] == "playback_finished":
                break
        assert seen == ["playback_started", "playback_finished"], seen


def test_each_event_has_its_exact_wire_shape() -> None:
    """The JSON of every outgoing message, byte for byte (keys in order), as sent."""
    cases: list[tuple[Outgoing, bytes]] = [
        (PlaybackStarted(3), b'{"type":"playback_started","utterance":3}'),
        (PlaybackFinished(3, 1234.5, False, "end"),
         b'{"type":"playback_finished","utterance":3,"position_ms":1234.5,'
         b'"interrupted":false,"reason":"end"}'),
        (PlaybackFinished(4, 0.0, True, "interrupt"),
         b'{"type":"playback_finished","utterance":4,"position_ms":0.0,'
         b'"interrupted":true,"reason":"interrupt"}'),
        (Underrun(2, 480.0), b'{"type":"underrun","utterance":2,"position_ms":480.0}'),
        (Refill(52.1, 160.0), b'{"type":"refill","buffered_ms":52.1,"target_ms":160.0}'),
        (Closed("deleted"), b'{"type":"closed","reason":"deleted"}'),
        (Ready(session_id="s1", lesson_id="l1", sample_rate=16_000, audio_rate=48_000,
               fps=25, node="n1", state="idle"),
         b'{"type":"ready","session_id":"s1","lesson_id":"l1","sample_rate":16000,'
         b'"audio_rate":48000,"fps":25,"node":"n1","state":"idle"}'),
        (Pong(), b'{"type":"pong"}'),
        (Pong(7), b'{"type":"pong","id":7}'),
        (Pong("a1"), b'{"type":"pong","id":"a1"}'),
        (ErrorReply("invalid_json", "bad"),
         b'{"type":"error","code":"invalid_json","message":"bad"}'),
    ]
    for ev, wire in cases:
        assert orjson.dumps(event_json(ev)) == wire, ev


async def test_ping_ids_are_echoed_as_sent(node: Node, http: aiohttp.ClientSession) -> None:
    s = await create_session(http, node, "ws-ping")
    async with http.ws_connect(s["ws_url"]) as ws:
        ready = await ws.receive_str(timeout=10)
        assert ready.startswith('{"type":"ready","session_id":')
        for sent, echoed in [({"type": "ping"}, '{"type":"pong"}'),
                             ({"type": "ping", "id": None}, '{"type":"pong"}'),
                             ({"type": "ping", "id": True}, '{"type":"pong"}'),
                             ({"type": "ping", "id": [1]}, '{"type":"pong"}'),
                             ({"type": "ping", "id": 1.5}, '{"type":"pong","id":1.5}'),
                             ({"type": "ping", "id": "x"}, '{"type":"pong","id":"x"}')]:
            await ws.send_json(sent)
            assert await ws.receive_str(timeout=10) == echoed, sent
