"""Lessons in a cluster of real nodes (``rapido serve --join`` processes with their own
Serf agents, on loopback): the same lesson asked of any node ends at one session on one
node; a killed owner's lesson gets one new owner, the same seen from every node."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.test_cluster import ClusterNode, Starter, _cluster, _members, _until, start_nodes
from tests.test_serf import write_keyring

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


@pytest.mark.slow
async def test_a_lesson_asked_of_every_node_ends_at_one_session(
        start_nodes: Starter, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    nodes = await start_nodes(["a1", "a2", "a3"], write_keyring(tmp_path / "k.json"),
                              env=SAME_REGION)
    await converge(http, nodes)
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
        start_nodes: Starter, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    nodes = await start_nodes(["k1", "k2", "k3"], write_keyring(tmp_path / "k.json"),
                              env=SAME_REGION)
    await converge(http, nodes)
    status, body = await create(http, nodes[0], "physics")
    assert status == 201, body
    owner = next(n for n in nodes if n.node_id == body["node"])
    others = [n for n in nodes if n is not owner]
    owner.proc.kill()  # kill -9: its agent goes with it (PDEATHSIG)
    killed = time.monotonic()

    async def failed_everywhere() -> bool:
        for n in others:
            m = _members(await _cluster(http, n)).get(owner.node_id)
            if m is None or m["state"] != "failed":
                return False
        return True

    assert await _until(failed_everywhere, 20), "the killed node was never seen failed"
    seen_failed = time.monotonic() - killed
    answers = await asyncio.gather(*(create(http, n, "physics") for n in others))
    again = time.monotonic() - killed
    assert all(s in (200, 201) for s, _ in answers), answers
    assert len({b["session_id"] for _, b in answers}) == 1, answers
    assert {b["node"] for _, b in answers} <= {n.node_id for n in others}, answers
    print(f"\nkill -9 seen failed by all after {seen_failed:.1f} s; "
          f"lesson answered again after {again:.1f} s")
