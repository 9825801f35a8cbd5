"""Lessons in a cluster of real nodes (``rapido serve --join`` processes with their own
Serf agents, on loopback): the same lesson asked of any node ends at one session on one
node; a killed owner's lesson gets one new owner, the same seen from every node."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import NodeFactory, create_session
from tests.test_cluster import (
    ClusterNode,
    Starter,
    _cluster,
    _members,
    _until,
    start_nodes,
    started_cluster,
)
from tests.test_serf import free_port, write_keyring

__all__ = ["start_nodes"]  # the fixture, used here by name

SAME_REGION = {"RAPIDO_REGION": "eu"}


async def create(http: aiohttp.ClientSession, node: ClusterNode,
                 lesson: str) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{node.url}/api/sessions", json={"lesson_id": lesson}) as r:
        return r.status, await r.json()


async def converge(http: aiohttp.ClientSession, nodes: list[ClusterNode],
                   timeout_s: float = 20.0) -> None:
    ids = {n.node_id for n in nodes}

    async def done() -> bool:
        for n in nodes:
            seen = _members(await _cluster(http, n))
            if {k for k, m in seen.items() if m["state"] == "alive"} != ids:
                return False
        return True

    assert await _until(done, timeout_s), "the nodes never saw each other"


@pytest.mark.parametrize(("body", "match"), [
    ([], "the body is"),
    ({"node": "a"}, "the body is"),
    ({"node": "a", "claims": {}, "x": 1}, "the body is"),
    ({"node": "a", "claims": "x"}, "a list"),
    ({"node": "a", "claims": [1]}, r"claims\[0\]"),
    ({"node": "a", "claims": [{"lesson_id": "l", "session_id": "b.%s" % ("0" * 32),
                               "created_at": 1.0}]}, "claiming node's"),
    ({"node": "a", "claims": [{"lesson_id": "", "session_id": "a.%s" % ("0" * 32),
                               "created_at": 1.0}]}, "lesson_id"),
    ({"node": "a", "claims": [{"lesson_id": "l", "session_id": "a.%s" % ("0" * 32),
                               "created_at": "yesterday"}]}, "created_at"),
    ({"node": "bad node", "claims": [{"lesson_id": "l", "session_id": "x",
                                      "created_at": 1.0}]}, "node_id"),
])
def test_bad_claims_are_refused_by_field(body: Any, match: str) -> None:
    from rapido.http.errors import ApiError
    from rapido.http.routing import parse_claims
    with pytest.raises(ApiError, match=match) as err:
        parse_claims(body)
    assert err.value.status == 400 and err.value.code == "invalid_claims"


def test_good_claims_parse() -> None:
    from rapido.http.routing import parse_claims
    sid = "a." + "f" * 32
    node, claims, lessons = parse_claims(
        {"node": "a", "claims": [{"lesson_id": "l", "session_id": sid, "created_at": 5}]})
    assert node == "a" and lessons == ["l"]
    assert claims[0].session_id == sid and claims[0].created_at == 5


async def test_a_single_node_has_no_routing_endpoints_and_ids_name_it(
        make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    node = await make_node(node_id="solo")
    for path, body in (("/api/cluster/claims", {"node": "solo", "claims": []}),
                       ("/api/cluster/moved", {"session_ids": []})):
        async with http.post(f"{node.url}{path}", json=body) as r:
            assert r.status == 404 and (await r.json())["error"] == "not_clustered"
    session = await create_session(http, node, "alone")
    assert session["session_id"].startswith("solo.") and session["node"] == "solo"


@pytest.mark.slow
async def test_regions_on_one_wan_pool_place_by_the_users_location(
        start_nodes: Starter, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Two regions in one Serf pool on the wan profile (no latency can be injected on
    loopback: this checks the function, not the timings): a user's coordinates pick the
    nearer region's node, a region code picks that region, no location the asked node's
    own region, whichever node is asked."""
    keyring = write_keyring(tmp_path / "k.json")
    fra = f"127.0.0.1:{free_port()}"
    # Both at once: iad joins fra's address (with the join's backoff if fra's agent is
    # not up yet).
    eu, us = await asyncio.gather(
        start_nodes(["fra"], keyring, binds=[fra], env={
            "RAPIDO_REGION": "eu", "RAPIDO_NODE_LOCATION": "50.11,8.68",
            "RAPIDO_CLUSTER_PROFILE": "wan", "RAPIDO_MAX_STREAMS": "16"}),
        start_nodes(["iad"], keyring, join=[fra], env={
            "RAPIDO_REGION": "us", "RAPIDO_NODE_LOCATION": "38.95,-77.45",
            "RAPIDO_CLUSTER_PROFILE": "wan", "RAPIDO_MAX_STREAMS": "16"}))
    nodes = [*eu, *us]
    await converge(http, nodes)
    berlin = {"lat": 52.52, "lon": 13.40}
    boston = {"lat": 42.36, "lon": -71.06}
    for i, front in enumerate(nodes):
        for lesson, where, expect in ((f"b{i}", berlin, "fra"), (f"o{i}", boston, "iad"),
                                      (f"r{i}", "us", "iad"), (f"c{i}", "eu", "fra"),
                                      (f"n{i}", None, front.node_id)):
            async with http.post(f"{front.url}/api/sessions",
                                 json={"lesson_id": lesson, "user_location": where}) as r:
                body = await r.json()
                assert r.status == 201, body
            assert body["node"] == expect, (front.node_id, where, body["node"])


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ClusterNode]]:
    """Five nodes of one region, joined together: the lessons asked of every node, then
    the killed owner (the last test of this module, as it kills a node)."""
    yield from started_cluster([f"a{i}" for i in range(1, 6)],
                               tmp_path_factory.mktemp("five"), env=SAME_REGION)


@pytest.mark.slow
async def test_a_lesson_asked_of_every_node_ends_at_one_session(
        five: list[ClusterNode], http: aiohttp.ClientSession) -> None:
    # Five nodes converge, then every lesson is asked of all five at once.
    nodes = five
    await converge(http, nodes, timeout_s=30)
    lessons = [f"lesson-{i}" for i in range(8)]
    owners: dict[str, str] = {}
    for lesson in lessons:
        # The same lesson through every node at once.
        answers = await asyncio.gather(*(create(http, n, lesson) for n in nodes))
        statuses = sorted(s for s, _ in answers)
        assert statuses[0] in (200, 201) and statuses[-1] in (200, 201), answers
        assert statuses.count(201) == 1, f"{lesson}: {statuses}"
        ids = {b["session_id"] for _, b in answers}
        assert len(ids) == 1, f"{lesson} got {len(ids)} sessions: {answers}"
        sid = ids.pop()
        node = {b["node"] for _, b in answers}
        assert node == {sid.split(".")[0]}, answers
        owners[lesson] = node.pop()
        for front, (_, body) in zip(nodes, answers, strict=True):
            # The URLs name the node the client asked, which routes them to the owner.
            assert body["ws_url"].startswith(front.url.replace("http://", "ws://")), body
            assert body["audio_url"].startswith(front.url), body
        if lesson in lessons[:2]:
            # Over the WebSocket too, through every node: the one owner answers.
            for _, body in answers:
                async with http.ws_connect(body["ws_url"]) as ws:
                    ready = await ws.receive_json(timeout=10)
                    assert ready["type"] == "ready" and ready["node"] == owners[lesson]
                    assert ready["session_id"] == sid
    # Asked again later, through each node: the same session, no new one.
    for lesson in lessons[:3]:
        for n in nodes:
            status, body = await create(http, n, lesson)
            assert status == 200 and body["node"] == owners[lesson], body
    # Nothing doubled anywhere, the lessons spread over the nodes, and no node asked
    # the cluster: the homes' records answered (the membership is older than the lessons
    # on none of them, so queries would be allowed: it is the records that made them
    # unnecessary... except for a home's first lesson after it started).
    counts: Counter[str] = Counter()
    for n in nodes:
        async with http.get(f"{n.url}/api/sessions") as r:
            local = (await r.json())["sessions"]
        counts[n.node_id] = len(local)
        assert {s["lesson_id"] for s in local} == \
            {lesson for lesson, o in owners.items() if o == n.node_id}
    assert sum(counts.values()) == len(lessons), counts
    assert len([c for c in counts.values() if c]) >= 2, f"no spread: {counts}"


@pytest.mark.slow
async def test_a_killed_owners_lesson_gets_one_new_owner_seen_from_every_node(
        five: list[ClusterNode], http: aiohttp.ClientSession) -> None:
    # The five nodes of the test above (this one kills one of them, so it comes last).
    nodes = five
    await converge(http, nodes)
    status, body = await create(http, nodes[0], "physics")
    assert status == 201, body
    owner = next(n for n in nodes if n.node_id == body["node"])
    others = [n for n in nodes if n is not owner]
    # A client of the lesson through another node: its socket is relayed to the owner.
    status, via = await create(http, others[0], "physics")
    assert status == 200 and via["session_id"] == body["session_id"], via
    ws = await http.ws_connect(via["ws_url"])
    assert (await ws.receive_json(timeout=10))["type"] == "ready"
    owner.proc.kill()  # kill -9: its agent goes with it (PDEATHSIG)
    killed = time.monotonic()
    # The relay tells the client at once (its connection to the owner broke).
    assert await _events_until_closed(ws, 15) == "node_lost"
    await ws.close()

    async def failed_everywhere() -> bool:
        for n in others:
            m = _members(await _cluster(http, n)).get(owner.node_id)
            if m is None or m["state"] != "failed":
                return False
        return True

    assert await _until(failed_everywhere, 20), "the killed node was never seen failed"
    seen_failed = time.monotonic() - killed
    # The old session's URLs, asked of any node, say its node is lost.
    for n in others:
        async with http.get(f"{n.url}/api/sessions/{body['session_id']}") as r:
            assert r.status == 404 and (await r.json())["error"] == "node_lost"
    answers = await asyncio.gather(*(create(http, n, "physics") for n in others))
    again = time.monotonic() - killed
    assert all(s in (200, 201) for s, _ in answers), answers
    assert len({b["session_id"] for _, b in answers}) == 1, answers
    assert {b["node"] for _, b in answers} <= {n.node_id for n in others}, answers
    print(f"\nkill -9 seen failed by all after {seen_failed:.1f} s; "
          f"lesson answered again after {again:.1f} s")


async def _events_until_closed(ws: aiohttp.ClientWebSocketResponse,
                               timeout_s: float) -> str | None:
    """The reason of the ``closed`` event the socket gets within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    ev = msg.json()
                    if ev.get("type") == "closed":
                        return str(ev["reason"])
    except TimeoutError:
        return None
    return None
