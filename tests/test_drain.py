"""Draining a node: ``POST /api/admin/drain`` (as SIGTERM), in a cluster of real
``rapido serve`` processes with real Serf agents, and its bad input."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from rapido.config import Config
from rapido.http.app import make_app
from rapido.metrics import Metrics
from rapido.wiring import build_engine, http_settings
from tests.conftest import API_KEY, NodeFactory, create_session, speech
from tests.test_api import wav_bytes
from tests.test_cluster import (  # noqa: F401 - start_nodes is a fixture
    Starter,
    _cluster,
    _members,
    _until,
    start_nodes,
)
from tests.test_serf import write_keyring

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def _drain(http: aiohttp.ClientSession, url: str,
                 headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.post(f"{url}/api/admin/drain", headers=headers) as r:
        return r.status, await r.json()


async def test_drain_needs_the_key_and_a_post(make_node: NodeFactory,
                                              http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none", api_key=API_KEY, drain_timeout_s=7)
    live = await create_session(http, node, "before", headers=AUTH)
    status, body = await _drain(http, node.url)
    assert status == 401 and body["error"] == "unauthorized", body
    status, body = await _drain(http, node.url, {"Authorization": "Bearer wrong-key-xxxx"})
    assert status == 401, body
    async with http.get(f"{node.url}/api/admin/drain", headers=AUTH) as r:
        assert r.status == 405 and (await r.json())["error"] == "method_not_allowed"
        assert "POST" in r.headers["Allow"]
    assert not node.engine.draining and not node.drain_requested.is_set()
    async with http.get(f"{node.url}/ready") as r:
        assert r.status == 200

    for _ in range(2):  # idempotent: the same answer again
        status, body = await _drain(http, node.url, AUTH)
        assert (status, body) == (202, {"draining": True, "drain_timeout_s": 7.0})
    assert node.drain_requested.is_set()  # serve() takes it from here
    async with http.get(f"{node.url}/ready") as r:
        assert r.status == 503 and (await r.json())["reason"] == "draining"
    async with http.post(f"{node.url}/api/sessions", json={"lesson_id": "late"},
                         headers=AUTH) as r:
        assert r.status == 503 and (await r.json())["error"] == "draining"
    # What runs plays on, and the same lesson still finds its session.
    async with http.get(f"{node.url}/api/sessions/{live['session_id']}", headers=AUTH) as r:
        assert r.status == 200
    async with http.get(f"{node.url}/api/cluster", headers=AUTH) as r:
        assert (await r.json())["node"]["draining"] is True


async def test_a_keyless_node_drains_from_loopback_only(make_node: NodeFactory,
                                                        http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none")
    # A page elsewhere cannot make the user's browser drain it.
    status, body = await _drain(http, node.url, {"Origin": "https://evil.example"})
    assert status == 403 and body["error"] == "forbidden_origin"
    assert not node.engine.draining
    status, body = await _drain(http, node.url)
    assert status == 202 and body["draining"] is True
    assert node.engine.draining


async def test_stop_closes_sessions_before_the_listener(make_node: NodeFactory,
                                                        http: aiohttp.ClientSession) -> None:
    """A single node: WebSocket clients are told ``closed`` (``shutdown``) before the
    listener goes."""
    node = await make_node(model="none")
    s = await create_session(http, node, "solo")
    async with http.ws_connect(s["ws_url"]) as ws:
        assert (await ws.receive_json())["type"] == "ready"
        stopping = asyncio.create_task(node.stop())
        closed = await _closed_event(ws)
        await stopping
    assert closed == {"type": "closed", "reason": "shutdown"}


async def _closed_event(ws: aiohttp.ClientWebSocketResponse,
                        timeout_s: float = 60) -> dict[str, Any] | None:
    """The ``closed`` event, reading past the others; None if the socket ended without."""
    async with asyncio.timeout(timeout_s):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                event: dict[str, Any] = msg.json()
                if event["type"] == "closed":
                    return event
    return None


@pytest.mark.slow
async def test_drain_in_a_cluster_tags_moves_leaves_and_exits_0(
        start_nodes: Starter,  # noqa: F811 - the fixture imported above
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """POST drain on A: B sees A draining within the gossip's delay while A's lesson
    plays out; A's WebSocket client gets ``closed`` ``moved``; A leaves (B lists it
    ``left``, not ``failed``) and exits 0."""
    keyring = write_keyring(tmp_path / "keyring.json")
    a, b = await start_nodes(["a", "b"], keyring)

    async def joined() -> bool:
        for n in (a, b):
            body = await _cluster(http, n)
            if {k: m["state"] for k, m in _members(body).items()} != {"a": "alive",
                                                                      "b": "alive"}:
                return False
        return True

    assert await _until(joined, 20), [await _cluster(http, n) for n in (a, b)]
    async with http.post(f"{a.url}/api/sessions", json={"lesson_id": "d1"}) as r:
        assert r.status == 201, await r.text()
        session = await r.json()
    # Six seconds of speech in flight: the drain waits for it (drain_timeout_s is 30).
    async with http.post(session["audio_url"], data=wav_bytes(speech(6.0), 16_000),
                         headers={"Content-Type": "audio/wav"}) as r:
        assert r.status == 202, await r.text()
    async with http.ws_connect(session["ws_url"]) as ws:
        assert (await ws.receive_json())["type"] == "ready"
        t0 = time.monotonic()
        status, body = await _drain(http, a.url)
        assert (status, body) == (202, {"draining": True, "drain_timeout_s": 30.0})

        async def seen_draining() -> dict[str, Any] | None:
            member = _members(await _cluster(http, b)).get("a")
            return member if member and member["draining"] else None

        member = await _until(seen_draining, 3.0)
        seen_after = time.monotonic() - t0
        assert member, await _cluster(http, b)
        assert member["state"] == "alive", member  # still a member while it drains
        # Draining, A still serves its lesson but takes no new one: a new lesson asked
        # of either node is placed on B.
        async with http.get(f"{a.url}/api/sessions/{session['session_id']}") as r:
            assert r.status == 200 and (await r.json())["state"] == "speaking"
        for front in (a, b):
            async with http.post(f"{front.url}/api/sessions",
                                 json={"lesson_id": f"d2-{front.node_id}"}) as r:
                assert r.status == 201 and (await r.json())["node"] == "b", await r.text()
        status, again = await _drain(http, a.url)
        assert (status, again) == (202, body)

        closed = await _closed_event(ws)
        played_s = time.monotonic() - t0
    assert closed == {"type": "closed", "reason": "moved"}, closed
    assert played_s > 4.0, "the speech in flight played out before the session closed"
    # The moved client comes back through the node it knows of and lands on B.
    async with http.post(f"{b.url}/api/sessions", json={"lesson_id": "d1"}) as r:
        assert r.status == 201 and (await r.json())["node"] == "b", await r.text()
    loop = asyncio.get_running_loop()
    rc = await loop.run_in_executor(None, lambda: a.proc.wait(timeout=30))
    assert rc == 0, "".join(a.output)
    assert "Traceback" not in "".join(a.output), "".join(a.output)

    async def left() -> bool:
        return _members(await _cluster(http, b)).get("a", {}).get("state") == "left"

    assert await _until(left, 10), await _cluster(http, b)
    assert (await _cluster(http, b))["cluster"] == "ok"  # a leave is no failure
    print(f"B saw A draining {seen_after:.2f} s after the POST")


async def test_an_app_without_a_node_to_stop_says_so(tmp_path: Path) -> None:
    """make_app without a DrainControl (no node to stop): 501, nothing drains."""
    config = Config(port=0, model="none", log_level="warning",
                    recordings_dir=str(tmp_path / "rec"), avatars_dir=str(tmp_path / "av"))
    metrics = Metrics()
    engine = build_engine(config, metrics)
    app = make_app(http_settings(config), metrics, engine)
    async with TestClient(TestServer(app)) as client:
        r = await client.post("/api/admin/drain")
        assert r.status == 501 and (await r.json())["error"] == "not_supported"
    assert not engine.draining
