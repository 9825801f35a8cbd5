"""WHEP's edges: viewer slots (reserved at once, freed on every way out, reaped when a
viewer never connects), offers with and without candidates, a closing session, ICE
servers, the offer's size, malformed viewer tokens."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcicetransport import connection_kwargs, parse_stun_turn_uri

from rapido.config import Config, ConfigError
from rapido.http.errors import ApiError
from rapido.http.whep import MAX_OFFER_BYTES, VIEWER_SECRET, check_token, mint_token
from rapido.pipeline.sinks.base import SinkError
from rapido.webrtc import SinkClosed, WebRtcSink
from rapido.webrtc.ice import parse_ice_urls
from rapido.webrtc.sink import Viewer
from tests.conftest import NodeFactory, create_session
from tests.test_webrtc import wait_for, watch

SDP = "application/sdp"


async def client_offer() -> tuple[RTCPeerConnection, str]:
    """A recvonly audio+video offer from a real aiortc client, with its candidates."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


def without_candidates(sdp: str) -> str:
    """What a trickling client POSTs first: the offer with no candidate at all."""
    return "".join(line + "\r\n" for line in sdp.splitlines()
                   if line and not line.startswith(("a=candidate", "a=end-of-candidates")))


@pytest.fixture
async def offer() -> AsyncIterator[str]:
    """An offer with no candidates from a client that then does nothing: it holds a
    slot until the connect timeout."""
    pc, sdp = await client_offer()
    await pc.close()
    yield without_candidates(sdp)


def ice_end(viewer: Viewer) -> bool:
    """Whether the server side of a viewer's ICE was told end-of-candidates."""
    transport = viewer.pc.getTransceivers()[0].receiver.transport.transport
    return bool(transport.iceGatherer._remote_candidates_end)


async def started(**kwargs: Any) -> WebRtcSink:
    sink = WebRtcSink(width=64, height=48, fps=25, **kwargs)
    await sink.start()
    return sink


# -- the sink ---------------------------------------------------------------------------


async def test_a_viewer_that_never_connects_is_reaped_and_its_slot_freed(offer: str) -> None:
    reaped: list[float] = []
    sink = await started(max_viewers=2, connect_timeout_s=1.0,
                         on_connect_timeout=lambda: reaped.append(time.monotonic()))
    try:
        t0 = time.monotonic()
        await sink.add_viewer(offer)
        await sink.add_viewer(offer)
        assert sink.full
        with pytest.raises(SinkError, match="limit of 2 viewers"):
            await sink.add_viewer(offer)
        await wait_for(lambda: not sink.viewers, timeout=10)
        assert len(reaped) == 2 and all(t - t0 >= 1.0 for t in reaped)
        assert sink.stats().json()["connect_timeouts"] == 2
        assert not sink.full
        await sink.add_viewer(offer)  # the slot is there again
    finally:
        await sink.aclose()
    assert not sink._reaping  # every reaped peer connection closed by aclose


async def test_concurrent_offers_cannot_overshoot_the_cap(offer: str) -> None:
    sink = await started(max_viewers=3)
    try:
        results = await asyncio.gather(*(sink.add_viewer(offer) for _ in range(8)),
                                       return_exceptions=True)
        assert sum(isinstance(r, tuple) for r in results) == 3
        assert all(isinstance(r, SinkError) for r in results if not isinstance(r, tuple))
        assert len(sink.viewers) == 3
        assert sink.stats().json()["viewers_joining"] == 0
    finally:
        await sink.aclose()


async def test_every_failed_offer_gives_its_slot_back(offer: str) -> None:
    sink = await started(max_viewers=1)
    try:
        # Refused after the slot was taken: by aiortc (no ICE credentials), and by the
        # sink (a data channel, no media).
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.createDataChannel("chat")
        await pc.setLocalDescription(await pc.createOffer())
        data_only = pc.localDescription.sdp
        await pc.close()
        no_ice = re.sub(r"a=ice-(ufrag|pwd):.*\r\n", "", offer)
        for bad in (no_ice, data_only, no_ice):
            with pytest.raises(ValueError, match=r"not accepted|no audio or video"):
                await sink.add_viewer(bad)
            assert sink.stats().json()["viewers_joining"] == 0 and not sink.viewers
        # A request cancelled mid-answer (the client went away).
        task = asyncio.ensure_future(sink.add_viewer(offer))
        await asyncio.sleep(0)  # it runs to its first await: the slot is taken
        assert sink.stats().json()["viewers_joining"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sink.stats().json()["viewers_joining"] == 0 and not sink.viewers
        await sink.add_viewer(offer)  # the one slot is free
    finally:
        await sink.aclose()


async def test_no_viewer_joins_a_closing_sink(offer: str) -> None:
    sink = await started()
    task = asyncio.ensure_future(sink.add_viewer(offer))
    await asyncio.sleep(0)  # it runs to its first await: the slot is taken
    assert sink.stats().json()["viewers_joining"] == 1
    await sink.aclose()  # begins while the offer is being answered
    with pytest.raises(SinkClosed):
        await task
    assert not sink.viewers and sink.stats().json()["viewers_joining"] == 0
    with pytest.raises(SinkClosed):
        await sink.add_viewer(offer)


async def test_offers_with_candidates_are_complete_and_without_them_wait(offer: str) -> None:
    pc, with_candidates = await client_offer()
    await pc.close()
    sink = await started()
    try:
        vid, _ = await sink.add_viewer(with_candidates)
        assert ice_end(sink.viewers[vid])  # aioice waits for no more candidates
        vid, _ = await sink.add_viewer(offer)
        assert not ice_end(sink.viewers[vid])  # still open to peer-reflexive ones
    finally:
        await sink.aclose()


async def test_an_offer_without_candidates_connects_through_its_own_checks() -> None:
    """A trickling client sends its offer before its candidates; it still connects
    through the peer-reflexive candidates its checks show, and stays past the timeout."""
    # 2.5 s: a real connection must beat it, ICE and DTLS on a loop this test shares.
    sink = await started(connect_timeout_s=2.5)
    pc, sdp = await client_offer()
    try:
        vid, answer = await sink.add_viewer(without_candidates(sdp))
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await wait_for(lambda: sink.viewers[vid].pc.connectionState == "connected")
        await asyncio.sleep(3.0)
        assert vid in sink.viewers and sink.stats().json()["connect_timeouts"] == 0
    finally:
        await pc.close()
        await sink.aclose()


# -- ICE servers ------------------------------------------------------------------------


async def test_no_ice_server_by_default(offer: str) -> None:
    """aiortc's own default would look up stun.l.google.com for every viewer."""
    assert Config().webrtc_ice_servers == ""
    sink = await started()
    try:
        vid, answer = await sink.add_viewer(offer)
        transport = sink.viewers[vid].pc.getTransceivers()[0].receiver.transport.transport
        assert transport.iceGatherer._connection.stun_server is None
        assert "srflx" not in answer
    finally:
        await sink.aclose()


def test_ice_server_urls_are_checked_and_reach_aiortc_as_given() -> None:
    urls = parse_ice_urls(" stun:stun.example.org:3478 , turn:10.0.0.1?transport=tcp,")
    assert urls == ("stun:stun.example.org:3478", "turn:10.0.0.1?transport=tcp")
    assert parse_ice_urls("") == ()
    for url in ("stun:a.example", "stun:10.1.2.3:19302", "turn:t.example:3478",
                "turn:t.example?transport=udp", "turns:t.example:5349?transport=tcp"):
        assert parse_ice_urls(url) == (url,)
        parse_stun_turn_uri(url)  # aiortc's own parser takes it too
    for bad in ("http://x", "stun:", "stun:a b", "stuns:x", "stun:x:99999", "turn:x?transport=sctp",
                "turns:x?transport=udp", "stun:[::1]:3478", "stun:a,stun:b", "turn:a,turns:b"):
        with pytest.raises(ValueError):
            parse_ice_urls(bad)
    sink = WebRtcSink(width=64, height=48, fps=25, ice_servers=urls,
                      turn_username="u", turn_password="p")
    assert connection_kwargs(sink._ice_servers) == {
        "stun_server": ("stun.example.org", 3478), "turn_server": ("10.0.0.1", 3478),
        "turn_ssl": False, "turn_transport": "tcp", "turn_username": "u",
        "turn_password": "p"}


def test_ice_servers_in_the_config() -> None:
    cfg = Config.load(env={"RAPIDO_WEBRTC_ICE_SERVERS": "stun:127.0.0.1:3478"})
    assert cfg.webrtc_ice_servers == "stun:127.0.0.1:3478"
    with pytest.raises(ConfigError, match="webrtc_ice_servers"):
        Config(webrtc_ice_servers="stun.l.google.com:19302")
    with pytest.raises(ConfigError, match="webrtc_turn_username"):
        Config(webrtc_ice_servers="turn:127.0.0.1")
    cfg = Config(webrtc_ice_servers="turn:127.0.0.1", webrtc_turn_username="u",
                 webrtc_turn_password="secret")
    assert cfg.redacted()["webrtc_turn_password"] == "***"
    with pytest.raises(ConfigError, match="whep_connect_timeout_s"):
        Config(whep_connect_timeout_s=0)
    with pytest.raises(ConfigError, match="webrtc_max_viewers"):
        Config(webrtc_max_viewers=0)


# -- over HTTP --------------------------------------------------------------------------


async def test_flood_of_silent_offers_is_reaped_then_a_viewer_connects(
        make_node: NodeFactory, http: aiohttp.ClientSession, offer: str) -> None:
    # 2.5 s: the real viewer below must connect within it on a loaded machine.
    node = await make_node(model="none", webrtc_max_viewers=3, whep_connect_timeout_s=2.5)
    s = await create_session(http, node, "whep-flood", sink="webrtc")
    headers = {"Content-Type": SDP, "Authorization": f"Bearer {s['viewer_token']}"}
    sink = node.engine.sessions[s["session_id"]].sink
    assert isinstance(sink, WebRtcSink)

    async def post() -> int:
        async with http.post(s["whep_url"], data=offer, headers=headers) as r:
            if r.status == 503:
                assert (await r.json())["error"] == "viewers_unavailable"
                assert r.headers["Retry-After"] == "5"
            return r.status

    statuses = await asyncio.gather(*(post() for _ in range(8)))
    assert sorted(statuses) == [201] * 3 + [503] * 5
    assert len(sink.viewers) == 3
    await wait_for(lambda: not sink.viewers, timeout=10)
    async with http.get(f"{node.url}/metrics") as r:
        assert "whep_connect_timeouts_total 3.0" in await r.text()
    async with http.get(f"{node.url}/api/sessions/{s['session_id']}") as r:
        assert (await r.json())["stats"]["sink"]["connect_timeouts"] == 3
    viewer = await watch(http, s["whep_url"], s["viewer_token"])
    try:
        await wait_for(lambda: len(viewer.of("video")) >= 10)
        await asyncio.sleep(2.7)  # past the timeout: a connected viewer stays
        assert len(sink.viewers) == 1 and sink.stats().json()["connect_timeouts"] == 3
    finally:
        await viewer.close()


async def test_a_closing_session_takes_no_viewer(
        make_node: NodeFactory, http: aiohttp.ClientSession, offer: str) -> None:
    node = await make_node(model="none")
    s = await create_session(http, node, "whep-closing", sink="webrtc")
    session = node.engine.sessions[s["session_id"]]
    await session.aclose()  # closed, not yet gone from the engine
    async with http.post(s["whep_url"], data=offer, headers={
            "Content-Type": SDP, "Authorization": f"Bearer {s['viewer_token']}"}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (409, "session_closing")
        assert "closing" in body["message"]


async def test_offer_size_limit(make_node: NodeFactory, http: aiohttp.ClientSession,
                                offer: str) -> None:
    node = await make_node(model="none")
    s = await create_session(http, node, "whep-big", sink="webrtc")
    headers = {"Content-Type": SDP, "Authorization": f"Bearer {s['viewer_token']}"}
    padded = offer + "a=x-pad:" + "p" * (MAX_OFFER_BYTES - len(offer) - 12) + "\r\n"
    assert len(padded) <= MAX_OFFER_BYTES
    async with http.post(s["whep_url"], data=padded, headers=headers) as r:
        assert r.status == 201, await r.text()  # at the limit: answered
    huge = offer + "a=x-pad:" + "p" * MAX_OFFER_BYTES + "\r\n"
    async with http.post(s["whep_url"], data=huge, headers=headers) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (413, "body_too_large")
        assert str(MAX_OFFER_BYTES) in body["message"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
        for _ in range(1024):
            yield b"a" * 1024

    async with http.post(s["whep_url"], data=chunked(), headers=headers) as r:
        assert (r.status, (await r.json())["error"]) == (413, "body_too_large")


@pytest.mark.parametrize("expiry", ["\u00b2", "1\u00b2", "\u0663" * 10, "9" * 5000, "9" * 21])
def test_malformed_token_expiry_is_unauthorized(expiry: str) -> None:
    with pytest.raises(ApiError) as exc:
        check_token(b"secret", "sid", f"{expiry}.{'0' * 64}")
    assert exc.value.status == 401


async def test_malformed_token_expiry_over_http(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none")
    s = await create_session(http, node, "whep-tok", sink="webrtc")
    good = mint_token(node.app[VIEWER_SECRET], s["session_id"], 60)
    mac = good.partition(".")[2]
    for expiry in ("\u00b2", "9" * 5000):
        async with http.post(s["whep_url"], params={"token": f"{expiry}.{mac}"},
                             data="v=0\r\n", headers={"Content-Type": SDP}) as r:
            assert (r.status, (await r.json())["error"]) == (401, "unauthorized")
