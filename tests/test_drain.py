"""Draining a node: ``POST /api/admin/drain`` (as SIGTERM) and its bad input. Draining
in a cluster of real ``rapido serve`` processes with real Serf agents is in
tests/test_cluster.py (it shares that module's pair of nodes)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from rapido.config import Config
from rapido.http.app import make_app
from rapido.metrics import Metrics
from rapido.wiring import build_engine, http_settings
from tests.conftest import API_KEY, NodeFactory, create_session

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
