"""Every node answers every session URL: two real nodes on loopback, the owner (where a
session lives) and the front (where the client comes), with a Locate the test steers.
REST, uploads, the WebSocket and WHEP (a real aiortc viewer) through the front; redirect
mode; a lost or unreachable owner; loops between nodes that disagree."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rapido.http.keys import WEBSOCKETS
from rapido.http.proxy import HOP_HEADER, Lost, Remote, Where
from rapido.node import Node
from rapido.webrtc import WebRtcSink
from tests.conftest import API_KEY, NodeFactory, create_session, speech
from tests.test_api import wav_bytes
from tests.test_webrtc import wait_for, watch
from tests.test_ws import CHUNK, next_event

AUTH = {"Authorization": f"Bearer {API_KEY}"}


class Steer:
    """A Locate set by hand: session id -> where it lives (unlisted: here)."""

    def __init__(self) -> None:
        self.where: dict[str, Where] = {}

    def __call__(self, sid: str) -> Where:
        return self.where.get(sid)


@dataclass
class Pair:
    owner: Node
    front: Node
    steer: Steer

    async def create(self, http: aiohttp.ClientSession, lesson: str,
                     **fields: Any) -> dict[str, Any]:
        """A session made on the owner, then as the front shows it."""
        made = await create_session(http, self.owner, lesson, headers=self.auth, **fields)
        sid = made["session_id"]
        self.steer.where[sid] = Remote("owner", self.owner.url)
        async with http.get(self.at_front(sid), headers=self.auth) as r:
            assert r.status == 200, await r.text()
            shown: dict[str, Any] = await r.json()
        return shown

    def at_front(self, sid: str, tail: str = "") -> str:
        return f"{self.front.url}/api/sessions/{sid}{tail}"

    @property
    def auth(self) -> dict[str, str]:
        return AUTH if self.owner.config.api_key else {}


async def start_pair(make_node: NodeFactory, *, owner: dict[str, Any] | None = None,
                     front: dict[str, Any] | None = None, key: str = API_KEY) -> Pair:
    """Both nodes share the API key, as a cluster's do (and so its token secrets)."""
    steer = Steer()
    o = await make_node(node_id="owner", model="none", api_key=key, **(owner or {}))
    f = await make_node(node_id="front", model="none", api_key=key, locate=steer,
                        **(front or {}))
    return Pair(o, f, steer)


@pytest.fixture
async def pair(make_node: NodeFactory) -> Pair:
    return await start_pair(make_node)


async def metric(http: aiohttp.ClientSession, node: Node, line: str) -> float:
    """The value of one sample of a node's /metrics (0 when it is not there yet)."""
    async with http.get(f"{node.url}/metrics") as r:
        text = await r.text()
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def upgrade_headers() -> dict[str, str]:
    """A WebSocket handshake by hand, to read what a refused one is answered."""
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()}


# -- REST -------------------------------------------------------------------------------


async def test_rest_through_the_front_is_the_owners_answer(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "rest")
    sid = s["session_id"]
    assert s["node"] == "owner" and sid not in pair.front.engine.sessions
    # The client's Host reached the owner: the URLs it wrote name the front.
    front = f"127.0.0.1:{pair.front.port}"
    assert s["ws_url"] == f"ws://{front}/ws/sessions/{sid}"
    assert s["audio_url"] == f"http://{front}/api/sessions/{sid}/audio"
    async with http.get(f"{pair.owner.url}/api/sessions/{sid}", headers=AUTH) as r:
        direct = await r.json()
    assert {k: direct[k] for k in ("session_id", "lesson_id", "node", "created_at")} == \
        {k: s[k] for k in ("session_id", "lesson_id", "node", "created_at")}

    async with http.head(pair.at_front(sid), headers=AUTH) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) > 100
    async with http.post(pair.at_front(sid, "/interrupt"), headers=AUTH) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["session_id"] == sid
    assert pair.owner.engine.sessions[sid].stats()["interrupts"] == 1
    async with http.delete(pair.at_front(sid), headers=AUTH) as r:
        assert r.status == 200
        assert (await r.json())["state"] == "closed"
    assert sid not in pair.owner.engine.sessions
    # The owner's own errors come back as it sent them.
    async with http.delete(pair.at_front(sid), headers=AUTH) as r:
        assert (r.status, (await r.json())["error"]) == (404, "session_not_found")
    async with http.get(pair.at_front(sid), headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401  # the front's own check: nothing unauthenticated is relayed
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="http",outcome="ok"}') == 5
    assert await metric(http, pair.front,
                        'proxy_first_byte_seconds_count{kind="http"}') == 5
    assert await metric(http, pair.owner,
                        'proxy_requests_total{kind="http",outcome="ok"}') == 0


async def test_uploads_through_the_front_play_on_the_owner(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "upload")
    sid = s["session_id"]
    session = pair.owner.engine.sessions[sid]
    async with http.post(s["audio_url"], data=wav_bytes(speech(0.5, rate=22_050), 22_050),
                         headers={"Content-Type": "audio/wav", **AUTH}) as r:
        assert r.status == 202, await r.text()
        body = await r.json()
        assert (body["input_sample_rate"], round(body["duration_ms"])) == (22_050, 500)
    async with http.post(s["audio_url"], data=speech(0.5).astype(">i2").tobytes(),
                         headers={"Content-Type": "audio/L16;rate=16000", **AUTH}) as r:
        assert r.status == 202, await r.text()
    await wait_for(lambda: session.stats()["utterances"] == 2, timeout=10)
    assert abs(session.stats()["received_ms"] - 1000.0) <= 2.0


async def test_the_owners_early_limits_answer_through_the_front(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    """The front reads no body: the owner's 413 (its own limit, lower than the front's)
    and its 429 from the Content-Length alone, while the body is still being sent."""
    pair = await start_pair(make_node, owner={"max_body_bytes": 64 * 1024,
                                              "max_queued_audio_s": 1.0})
    s = await pair.create(http, "limits")
    big = wav_bytes(speech(3.5), 16_000)  # 112 KB: under the front's 16 MiB
    async with http.post(s["audio_url"], data=big,
                         headers={"Content-Type": "audio/wav", **AUTH}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (413, "body_too_large")
        assert "65536" in body["message"]

    sent_rest = asyncio.Event()
    release = asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"\0" * 1000
        await release.wait()  # the rest only once the answer is in
        sent_rest.set()
        yield b"\0" * 23_000

    # 1.5 s of 8 kHz L16 declared; the owner holds at most 1 s.
    headers = {"Content-Type": "audio/L16;rate=8000", "Content-Length": "24000", **AUTH}
    async with asyncio.timeout(10):
        async with http.post(s["audio_url"], data=stalled(), headers=headers) as r:
            assert not sent_rest.is_set()
            body = await r.json()
            assert (r.status, body["error"]) == (429, "queue_full")
            assert r.headers["Retry-After"] == "5"
    release.set()
    # The relay's connections are still good for the next request.
    async with http.get(s["audio_url"].removesuffix("/audio"), headers=AUTH) as r:
        assert r.status == 200


class Echo:
    """A plain HTTP server standing in for an owner, to see what the front sends it and
    to answer in ways a node does not (streamed, gzip, cut off)."""

    def __init__(self) -> None:
        self.go_on = asyncio.Event()
        self.plain = os.urandom(3000)  # gzip does not shrink it below the first write
        self.data = gzip.compress(self.plain)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode = request.query.get("mode", "echo")
        if mode == "drop":  # a WebSocket whose node dies: no close frame, no closed event
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str('{"type":"ready"}')
            await self.go_on.wait()
            assert request.transport is not None
            request.transport.close()
            return ws
        if mode == "echo":
            body = await request.read()
            return web.json_response({
                "method": request.method, "raw_path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "chunked": request.headers.get("Transfer-Encoding") == "chunked",
                "length": len(body), "sha": hashlib.sha256(body).hexdigest()})
        response = web.StreamResponse(status=203, reason="Streamed", headers={
            "Set-Cookie": "a=1", "Connection": "X-Hop", "X-Hop": "dropped",
            "Content-Encoding": "gzip", "Content-Type": "text/plain"})
        response.headers.add("Set-Cookie", "b=2")
        await response.prepare(request)
        data = self.data
        await response.write(data[:100])
        await self.go_on.wait()  # the client must have the first bytes before this
        if mode == "break":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(data[100:])
        await response.write_eof()
        return response

    async def aclose(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    await server.start()
    yield server
    server.go_on.set()
    await server.aclose()


async def test_what_the_owner_is_sent_and_what_comes_back(
        pair: Pair, echo: Echo, http: aiohttp.ClientSession) -> None:
    sid = "echo." + "cd" * 16
    pair.steer.where[sid] = Remote("echo", echo.url)
    url = f"{pair.front.url}/api/sessions/{sid}/audio?b=%20x&a=1&a=2"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * 1000

    sent = b"".join(bytes([i]) * 1000 for i in range(50))
    headers = {**AUTH, "Connection": "keep-alive, X-Private", "X-Private": "secret",
               "Keep-Alive": "timeout=5", "X-Forwarded-For": "10.0.0.1",
               "Proxy-Authorization": "Basic eA==", "Content-Type": "audio/wav"}
    async with http.post(url, data=chunks(), headers=headers) as r:
        assert r.status == 200
        got = await r.json()
    seen = {k.lower(): v for k, v in got["headers"]}
    assert got["raw_path"] == f"/api/sessions/{sid}/audio?b=%20x&a=1&a=2"
    assert (got["method"], got["length"], got["sha"]) == \
        ("POST", len(sent), hashlib.sha256(sent).hexdigest())
    assert got["chunked"]  # no length was given: streamed chunked
    assert seen["host"] == f"127.0.0.1:{pair.front.port}"
    assert seen["authorization"] == AUTH["Authorization"]
    assert seen["content-type"] == "audio/wav"
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen[HOP_HEADER.lower()] == "1"
    for hop in ("x-private", "keep-alive", "proxy-authorization"):
        assert hop not in seen, hop
    assert "user-agent" not in seen or seen["user-agent"].startswith("Python")
    # A known length is sent as it is (the owner's early checks read it).
    async with http.post(url, data=sent, headers=AUTH) as r:
        got = await r.json()
    seen = {k.lower(): v for k, v in got["headers"]}
    assert seen["content-length"] == str(len(sent)) and not got["chunked"]
    assert got["length"] == len(sent)

    # The answer streams back as it comes, bytes as sent (gzip), hop-by-hop fields out.
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(f"{pair.front.url}/api/sessions/{sid}?mode=stream",
                           headers=AUTH) as r:
            assert (r.status, r.reason) == (203, "Streamed")
            assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert "X-Hop" not in r.headers and r.headers["Content-Encoding"] == "gzip"
            first = await r.content.readexactly(100)
            echo.go_on.set()
            whole = first + await r.read()
        assert whole == echo.data and gzip.decompress(whole) == echo.plain


async def test_an_answer_cut_off_upstream_is_cut_off_downstream(
        pair: Pair, echo: Echo, http: aiohttp.ClientSession) -> None:
    sid = "echo." + "ef" * 16
    pair.steer.where[sid] = Remote("echo", echo.url)
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(f"{pair.front.url}/api/sessions/{sid}?mode=break",
                           headers=AUTH) as r:
            assert r.status == 203
            await r.content.readexactly(100)
            echo.go_on.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()  # truncated, never a clean end
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="http",outcome="unreachable"}') == 1


# -- WebSocket --------------------------------------------------------------------------


async def test_websocket_through_the_front_plays_on_the_owner(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "ws")
    sid = s["session_id"]
    session = pair.owner.engine.sessions[sid]
    # A browser's way in: the session's ws_token in the URL, no header. Both nodes check
    # it (the owner needs credentials too), so it must reach the owner.
    async with http.ws_connect(f"{s['ws_url']}?token={s['ws_token']}") as ws:
        ready = await next_event(ws, "ready")
        assert (ready["node"], ready["session_id"]) == ("owner", sid)
        assert len(pair.front.app[WEBSOCKETS]) == 1
        assert await metric(http, pair.front, "proxy_websockets") == 1
        await ws.send_json({"type": "ping", "id": "p1"})
        assert (await next_event(ws, "pong"))["id"] == "p1"
        frames_before = session.stats()["frames_out"]
        audio = speech(1.0)
        for start in range(0, len(audio), CHUNK):  # as fast as the relay takes it
            await ws.send_bytes(audio[start:start + CHUNK].tobytes())
        await ws.send_json({"type": "end"})
        started = await next_event(ws, "playback_started")
        finished = await next_event(ws, "playback_finished")
        assert finished["utterance"] == started["utterance"]
        assert abs(finished["position_ms"] - 1000.0) <= 40.0
        stats = session.stats()
        assert stats["received_ms"] == pytest.approx(1000.0, abs=1.0)
        # A bad message is the owner's to answer; the socket stays.
        assert stats["frames_out"] >= frames_before + 25  # a second of speech, at least
        await ws.send_str("not json")
        assert (await next_event(ws, "error"))["code"] == "invalid_json"

        # The owner ends the session: its own closed event comes through, then a close.
        async with http.delete(pair.at_front(sid), headers=AUTH) as r:
            assert r.status == 200
        assert (await next_event(ws, "closed"))["reason"] == "deleted"
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1000
    await wait_for(lambda: not pair.front.app[WEBSOCKETS])
    assert await metric(http, pair.front, "proxy_websockets") == 0
    assert await metric(http, pair.front, 'proxy_requests_total{kind="ws",outcome="ok"}') == 1


async def test_a_client_closing_its_socket_closes_the_owners(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "ws-client-close")
    session = pair.owner.engine.sessions[s["session_id"]]
    async with http.ws_connect(s["ws_url"], headers=AUTH) as ws:
        await next_event(ws, "ready")
        assert session.listeners == 1
        await ws.close(code=4000, message=b"bye")
    await wait_for(lambda: session.listeners == 0, timeout=5)
    assert not pair.front.app[WEBSOCKETS]
    assert not session.closed  # the session outlives its socket, as it does directly


async def test_a_front_that_stops_closes_its_relayed_sockets(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "ws-front-stop")
    session = pair.owner.engine.sessions[s["session_id"]]
    async with http.ws_connect(s["ws_url"], headers=AUTH) as ws:
        await next_event(ws, "ready")
        await asyncio.wait_for(pair.front.stop(), 10)
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
    await wait_for(lambda: session.listeners == 0, timeout=5)
    assert not session.closed  # the session is the owner's: it goes on


async def test_a_refused_upgrade_is_the_owners_http_answer(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    sid = "owner." + "ab" * 16  # a cluster id the owner does not have
    pair.steer.where[sid] = Remote("owner", pair.owner.url)
    url = f"{pair.front.url}/ws/sessions/{sid}"
    async with http.get(url, headers={**upgrade_headers(), **AUTH}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (404, "session_not_found")
        assert sid in body["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(url, headers=AUTH)
    assert exc.value.status == 404
    # Answered by the owner: each refused upgrade is asked again without it (aiohttp
    # keeps no body of a refused handshake), so twice each.
    assert await metric(http, pair.owner, 'http_requests_total{method="GET",'
                        'route="/ws/sessions/{session_id}",status="404"}') == 4
    # Not an upgrade at all: relayed as plain HTTP, and the owner's 400 (or here its 404).
    async with http.get(url, headers=AUTH) as r:
        assert r.status == 404


async def test_a_lost_node_ends_the_relayed_socket_with_node_lost(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "ws-lost")
    sid = s["session_id"]
    async with http.ws_connect(s["ws_url"], headers=AUTH) as ws:
        await next_event(ws, "ready")
        pair.steer.where[sid] = Lost("owner")  # the cluster's view: the node failed
        assert await ws.receive_json(timeout=3) == {"type": "closed", "reason": "node_lost"}
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
    await wait_for(lambda: not pair.front.app[WEBSOCKETS])
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="ws",outcome="lost"}') == 1
    async with http.get(pair.at_front(sid), headers=AUTH) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (404, "node_lost")
        assert "'owner'" in body["message"] and "create the lesson's session again" \
            in body["message"]


async def test_a_socket_to_the_owner_that_drops_ends_with_node_lost(
        pair: Pair, echo: Echo, http: aiohttp.ClientSession) -> None:
    sid = "echo." + "ab" * 16
    pair.steer.where[sid] = Remote("echo", echo.url)
    async with http.ws_connect(f"{pair.front.url}/ws/sessions/{sid}?mode=drop",
                               headers=AUTH) as ws:
        assert await ws.receive_json(timeout=5) == {"type": "ready"}
        echo.go_on.set()
        assert await ws.receive_json(timeout=5) == {"type": "closed", "reason": "node_lost"}
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)


async def test_an_owner_that_stops_relays_its_goodbye_then_502(
        pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "ws-stop")
    sid = s["session_id"]
    async with http.ws_connect(s["ws_url"], headers=AUTH) as ws:
        await next_event(ws, "ready")
        # A node that stops closes its sessions first: the owner's own closed event
        # (a single node says shutdown) is relayed as it is, not as node_lost.
        await pair.owner.stop()
        assert await ws.receive_json(timeout=5) == {"type": "closed", "reason": "shutdown"}
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
    # The view still says "owner" (it has not noticed yet): the port refuses.
    for url in (pair.at_front(sid), s["ws_url"]):
        async with http.get(url, headers=AUTH) as r:
            body = await r.json()
            assert (r.status, body["error"]) == (502, "node_unreachable"), url
            assert "'owner'" in body["message"] and "127.0.0.1" not in body["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(s["ws_url"], headers=AUTH)
    assert exc.value.status == 502
    # The plain GET of the socket's URL was relayed as HTTP.
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="http",outcome="unreachable"}') == 2
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="ws",outcome="unreachable"}') == 1


# -- WHEP -------------------------------------------------------------------------------


async def test_whep_through_the_front(pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "whep", sink="webrtc")
    sid = s["session_id"]
    assert s["whep_url"] == f"{pair.front.url}/whep/{sid}"
    sink = pair.owner.engine.sessions[sid].sink
    assert isinstance(sink, WebRtcSink)
    # The offer goes through the front; the answer carries the owner's candidates, and
    # the media flows from the owner straight to the viewer.
    viewer = await watch(http, s["whep_url"], s["viewer_token"])
    try:
        await wait_for(lambda: len(viewer.of("video")) >= 5, timeout=15)
        assert viewer.location.startswith(f"/whep/{sid}/") and len(sink.viewers) == 1
        bearer = {"Authorization": f"Bearer {s['viewer_token']}"}
        async with http.delete(f"{pair.front.url}{viewer.location}") as r:
            assert r.status == 401  # the owner's token check, relayed
        async with http.delete(f"{pair.front.url}{viewer.location}", headers=bearer) as r:
            assert r.status == 200, await r.text()
        assert not sink.viewers
        async with http.delete(f"{pair.front.url}{viewer.location}", headers=bearer) as r:
            assert (r.status, (await r.json())["error"]) == (404, "viewer_not_found")
    finally:
        await viewer.close()


# -- redirect mode ----------------------------------------------------------------------


async def test_redirect_mode_sends_rest_and_whep_to_the_owner_and_relays_websockets(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    pair = await start_pair(make_node, front={"cluster_redirect": True})
    made = await create_session(http, pair.owner, "redir", headers=AUTH, sink="webrtc")
    sid = made["session_id"]
    pair.steer.where[sid] = Remote("owner", pair.owner.url)
    cases = [("GET", f"/api/sessions/{sid}?verbose=1%202"),
             ("POST", f"/api/sessions/{sid}/audio"),
             ("POST", f"/whep/{sid}?token={made['viewer_token']}"),
             ("DELETE", f"/whep/{sid}/v1")]
    for method, path in cases:
        async with http.request(method, f"{pair.front.url}{path}", headers=AUTH,
                                data=b"v=0\r\n", allow_redirects=False) as r:
            assert r.status == 307, (method, path)
            assert r.headers["Location"] == f"{pair.owner.url}{path}"
    async with http.ws_connect(f"{pair.front.url}/ws/sessions/{sid}", headers=AUTH) as ws:
        assert (await next_event(ws, "ready"))["node"] == "owner"
    async with http.get(f"{pair.front.url}/api/openapi.json") as r:
        paths = (await r.json())["paths"]
    assert "307" in paths["/api/sessions/{session_id}"]["get"]["responses"]
    assert "307" in paths["/whep/{session_id}"]["post"]["responses"]
    assert "307" not in paths["/ws/sessions/{session_id}"]["get"]["responses"]
    pair.steer.where[sid] = Lost("owner")
    async with http.get(f"{pair.front.url}/api/sessions/{sid}", headers=AUTH,
                        allow_redirects=False) as r:
        assert (r.status, (await r.json())["error"]) == (404, "node_lost")
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="redirect",outcome="ok"}') == 4
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="redirect",outcome="lost"}') == 1


# -- what is not relayed, and loops -----------------------------------------------------


async def test_hops_and_what_stays_local(pair: Pair, http: aiohttp.ClientSession) -> None:
    s = await pair.create(http, "hops")
    url = pair.at_front(s["session_id"])
    async with http.get(url, headers={HOP_HEADER: "1", **AUTH}) as r:
        assert r.status == 200  # one relay before this one: still relayed
    async with http.get(url, headers={HOP_HEADER: "2", **AUTH}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (508, "loop_detected")
    for bad in ("x", "-1", "1.0", "\u00b2", "9999"):
        async with http.get(url, headers={HOP_HEADER: bad, **AUTH}) as r:
            assert (r.status, (await r.json())["error"]) == (400, "invalid_hop"), bad
    # A method the path does not take is this node's 405, never relayed.
    async with http.put(url, headers=AUTH) as r:
        assert (r.status, (await r.json())["error"]) == (405, "method_not_allowed")
    # Ids the view does not place (any shape) are served here, as on a single node.
    for sid in ("nope", "owner." + "0" * 32, "a" * 300):
        async with http.get(pair.at_front(sid), headers=AUTH) as r:
            assert (r.status, (await r.json())["error"]) == (404, "session_not_found")
    assert await metric(http, pair.owner, 'http_requests_total{method="PUT",'
                        'route="unmatched",status="405"}') == 0
    assert await metric(http, pair.front,
                        'proxy_requests_total{kind="http",outcome="loop"}') == 1


async def test_nodes_that_disagree_stop_after_two_relays(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    a_view, b_view = Steer(), Steer()
    a = await make_node(node_id="a", model="none", api_key=API_KEY, locate=a_view)
    b = await make_node(node_id="b", model="none", api_key=API_KEY, locate=b_view)
    sid = "c." + "12" * 16
    a_view.where[sid] = Remote("b", b.url)  # a thinks b has it, b thinks a has it
    b_view.where[sid] = Remote("a", a.url)
    async with http.get(f"{a.url}/api/sessions/{sid}", headers=AUTH) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (508, "loop_detected")  # a, b, then a again
    assert await metric(http, a, 'proxy_requests_total{kind="http",outcome="loop"}') == 1
    assert await metric(http, b, 'proxy_requests_total{kind="http",outcome="ok"}') == 1


async def test_keyless_nodes_relay_with_the_owners_host(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    """Keyless nodes refuse a Host or Origin not their own; the front checks the
    client's against itself and sends the owner the owner's, and X-Forwarded-Host: the
    URLs of the answer name the front."""
    pair = await start_pair(make_node, key="")
    s = await pair.create(http, "keyless")
    assert s["ws_url"].startswith(f"ws://127.0.0.1:{pair.front.port}/")
    origin = {"Origin": pair.front.url}
    async with http.post(pair.at_front(s["session_id"], "/interrupt"), headers=origin) as r:
        assert r.status == 200, await r.text()
    async with http.post(pair.at_front(s["session_id"], "/interrupt"),
                         headers={"Origin": "http://evil.example"}) as r:
        assert (r.status, (await r.json())["error"]) == (403, "forbidden_origin")
    async with http.ws_connect(s["ws_url"], origin=pair.front.url) as ws:
        assert (await next_event(ws, "ready"))["node"] == "owner"
