"""The cluster service in real nodes: ``python -m rapido serve --join ...`` processes, each
with its own real Serf agent, on loopback; a single node without an agent; settings."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rapido.cluster.agent import SerfAgent, SerfAgentSettings
from rapido.config import Config, ConfigError
from tests.conftest import REPO, NodeFactory, speech, system_tool
from tests.test_api import wav_bytes
from tests.test_drain import _closed_event
from tests.test_drain import _drain as post_drain
from tests.test_serf import free_port, write_keyring


@dataclass
class ClusterNode:
    proc: subprocess.Popen[str]
    node_id: str
    bind: str
    url: str = ""
    output: list[str] = field(default_factory=list)


def _spawn(node_id: str, bind: str, join: list[str], keyring: Path, tmp: Path,
           serf_dir: str, env_extra: dict[str, str] | None = None) -> ClusterNode:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAPIDO_MODEL": "none",
           "RAPIDO_LOG_LEVEL": "warning", "RAPIDO_RECORDINGS_DIR": str(tmp / "rec"),
           "RAPIDO_AVATARS_DIR": str(tmp / "avatars"), "RAPIDO_MAX_STREAMS": "4",
           "RAPIDO_REGION": f"r-{node_id}", "PYTHONPATH": str(REPO),
           "PATH": f"{serf_dir}:{os.environ.get('PATH', '')}", **(env_extra or {})}
    args = [sys.executable, "-m", "rapido", "serve", "--port", "0", "--node-id", node_id,
            "--join", ",".join(join), "--cluster-bind", bind,
            "--cluster-rpc-port", str(free_port()), "--cluster-key-file", str(keyring)]
    proc = subprocess.Popen(args, cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return ClusterNode(proc, node_id, bind)


def _read_url(node: ClusterNode) -> None:
    """Read the node's output until it says where it serves (blocking), then keep
    reading it in a thread of its own (a node may outlive the loop that started it)."""
    assert node.proc.stdout is not None
    deadline = time.monotonic() + 60
    while not node.url:
        line = node.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{node.node_id} exited early:\n{''.join(node.output)}")
        node.output.append(line)
        m = re.search(r"rapido serving at (http://\S+?)/ ", line)
        if m:
            node.url = m.group(1)
        assert time.monotonic() < deadline, f"{node.node_id} never said where it serves"
    threading.Thread(target=_drain, args=(node,), daemon=True).start()


async def _wait_url(node: ClusterNode) -> None:
    await asyncio.to_thread(_read_url, node)


def _drain(node: ClusterNode) -> None:
    assert node.proc.stdout is not None
    for line in node.proc.stdout:
        node.output.append(line)


def spawn_nodes(ids: list[str], keyring: Path, tmp: Path, join: list[str] | None = None,
                env: dict[str, str] | None = None, binds: list[str] | None = None
                ) -> list[ClusterNode]:
    """Start ``rapido serve`` processes at once (each joining ``join``, by default all of
    them); return without waiting for them. ``binds``: the first ones' gossip addresses
    (a free port for the rest)."""
    serf = system_tool("serf")
    binds = [*(binds or []), *(f"127.0.0.1:{free_port()}" for _ in ids)][:len(ids)]
    return [_spawn(i, b, join or binds, keyring, tmp, str(Path(serf).parent), env)
            for i, b in zip(ids, binds, strict=True)]


def stop_nodes(nodes: list[ClusterNode]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.kill()
    for n in nodes:
        n.proc.wait(timeout=30)


def started_cluster(ids: list[str], tmp: Path, env: dict[str, str] | None = None
                    ) -> Iterator[list[ClusterNode]]:
    """A cluster for a module-scoped fixture (several tests share it; a test that kills
    a node comes last among them): ``ids`` joined together, on a keyring of their own,
    started at once and serving when it yields; killed afterwards."""
    nodes = spawn_nodes(ids, write_keyring(tmp / "keyring.json"), tmp, env=env)
    try:
        for n in nodes:
            _read_url(n)
        yield nodes
    finally:
        stop_nodes(nodes)


Starter = Callable[..., Awaitable[list[ClusterNode]]]


@pytest.fixture
async def start_nodes(tmp_path: Path) -> AsyncIterator[Starter]:
    nodes: list[ClusterNode] = []

    async def start(ids: list[str], keyring: Path, join: list[str] | None = None,
                    env: dict[str, str] | None = None, binds: list[str] | None = None
                    ) -> list[ClusterNode]:
        started = spawn_nodes(ids, keyring, tmp_path, join, env, binds)
        nodes.extend(started)
        await asyncio.gather(*(_wait_url(n) for n in started))
        return started

    yield start
    stop_nodes(nodes)


async def _cluster(http: aiohttp.ClientSession, node: ClusterNode | str) -> dict[str, Any]:
    url = node if isinstance(node, str) else node.url
    async with http.get(f"{url}/api/cluster") as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def _until(probe: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.25)


async def _more(value: Awaitable[int], than: int) -> int:
    """``value`` when it is over ``than``, else 0 (for ``_until``)."""
    got = await value
    return got if got > than else 0


def _members(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["node_id"]: m for m in body["members"]}


@pytest.mark.slow
async def test_three_nodes_converge_share_load_and_see_failures(
        start_nodes: Starter, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    keyring = write_keyring(tmp_path / "keyring.json")
    nodes = await start_nodes(["n1", "n2", "n3"], keyring)
    urls = {n.node_id: n.url for n in nodes}

    async def converged() -> bool:
        for n in nodes:
            seen = _members(await _cluster(http, n))
            if {k: (m["state"], m["url"], m["region"]) for k, m in seen.items()} != \
                    {k: ("alive", u, f"r-{k}") for k, u in urls.items()}:
                return False
        return True

    assert await _until(converged, 20), [await _cluster(http, n) for n in nodes]
    body = await _cluster(http, nodes[0])
    assert body["cluster"] == "ok" and "error" not in body
    assert body["node"]["node_id"] == "n1" and body["node"]["capacity"] == 4
    assert all(m["free_slots"] == 4 and m["version"] for m in body["members"])
    async with http.get(f"{nodes[1].url}/ready") as r:
        ready = await r.json()
        assert r.status == 200 and ready["cluster"] == "ok"
        assert ready["cluster_members"] == 3

    # A session on n1 shows up as one free slot fewer on the others (n1's tag write).
    async with http.post(f"{nodes[0].url}/api/sessions", json={"lesson_id": "c1"}) as r:
        assert r.status == 201, await r.text()

    async def seen_busy() -> bool:
        views = [_members(await _cluster(http, n)) for n in nodes[1:]]
        return all(v["n1"]["free_slots"] == 3 for v in views)

    assert await _until(seen_busy, 20)  # a tag write may wait its interval (4 s at 3)
    assert (await _cluster(http, nodes[0]))["node"]["free_slots"] == 3

    # A node with another keyring cannot join: it serves alone and says why.
    stranger, = await start_nodes(["n4"], write_keyring(tmp_path / "other.json"),
                                  join=[nodes[0].bind])

    async def refused() -> dict[str, Any] | None:
        body = await _cluster(http, stranger)
        return body if body["cluster"] == "degraded" and "error" in body else None

    body = await _until(refused, 15)
    assert body, await _cluster(http, stranger)
    assert list(_members(body)) == ["n4"] and "cannot join" in body["error"]
    assert "n4" not in _members(await _cluster(http, nodes[0]))
    async with http.get(f"{stranger.url}/ready") as r:
        ready = await r.json()
        assert r.status == 200 and ready["cluster"] == "degraded"
        assert "cluster_error" not in ready  # it names addresses: key holders only

    # kill -9: its agent dies with it, and the others see it fail.
    nodes[2].proc.kill()

    async def failed() -> bool:
        views = [_members(await _cluster(http, n)) for n in nodes[:2]]
        return all(v["n3"]["state"] == "failed" for v in views)

    assert await _until(failed, 15), [await _cluster(http, n) for n in nodes[:2]]
    assert (await _cluster(http, nodes[0]))["cluster"] == "degraded"

    # SIGTERM: the node leaves gracefully before it stops.
    nodes[1].proc.terminate()
    assert nodes[1].proc.wait(timeout=30) == 0, "".join(nodes[1].output)

    async def left() -> bool:
        return _members(await _cluster(http, nodes[0]))["n2"]["state"] == "left"

    assert await _until(left, 10), await _cluster(http, nodes[0])


@pytest.mark.slow
async def test_a_member_with_bad_tags_is_left_out_counted_and_logged_once(
        make_node: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    serf = system_tool("serf")
    keyring = write_keyring(tmp_path / "keyring.json")
    bind = f"127.0.0.1:{free_port()}"
    node = await make_node(model="none", node_id="good", join=bind, cluster_bind=bind,
                           cluster_rpc_port=free_port(), cluster_key_file=str(keyring))
    assert node.cluster is not None and node.cluster.agent is not None
    assert node.cluster.agent.pid in _serf_children()  # the agent is our child
    # A Serf member that is no rapido node: its tags say nothing we can read.
    stranger = SerfAgent(SerfAgentSettings(
        node="bogus", bind=f"127.0.0.1:{free_port()}", rpc_port=free_port(),
        keyring_file=keyring, binary=serf, tags={"id": "bogus", "url": "ftp://x"},
        stop_timeout_s=4.0))
    await stranger.start()
    try:
        assert stranger.client is not None
        assert await stranger.client.join([bind]) == 1

        async def counted() -> bool:
            async with http.get(f"{node.url}/metrics") as r:
                text = await r.text()
            m = re.search(r"^cluster_bad_tags_total (\S+)$", text, re.MULTILINE)
            return m is not None and float(m.group(1)) >= 2  # seen on two reads

        assert await _until(counted, 10)
        body = await _cluster(http, node.url)
        assert list(_members(body)) == ["good"] and body["cluster"] == "ok"
        logged = [r for r in caplog.records if "left out of the view" in r.getMessage()]
        assert len(logged) == 1 and "bogus" in logged[0].getMessage()
    finally:
        await stranger.aclose(leave=False)


@pytest.mark.slow
async def test_closing_while_the_agent_restarts_leaves_no_agent(
        make_node: NodeFactory, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    system_tool("serf")
    keyring = write_keyring(tmp_path / "keyring.json")
    bind = f"127.0.0.1:{free_port()}"
    node = await make_node(model="none", node_id="solo", join=bind, cluster_bind=bind,
                           cluster_rpc_port=free_port(), cluster_key_file=str(keyring))
    cluster = node.cluster
    assert cluster is not None and cluster.agent is not None
    old = cluster.agent.pid
    assert old is not None and _serf_children() == [old]
    os.kill(old, signal.SIGKILL)

    async def restarting() -> bool:
        return cluster.restarts >= 1  # counted as the new agent is being started

    assert await _until(restarting, 5)
    await cluster.aclose(leave=False)  # most likely inside SerfAgent.start()
    assert cluster.agent is None and not _serf_children()
    async with http.get(f"{node.url}/ready") as r:
        assert r.status == 200


def _serf_children(parent: int | None = None) -> list[int]:
    me = str(os.getpid() if parent is None else parent)
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
        except OSError:
            continue
        comm, _, fields = rest.rpartition(") ")
        if fields.split()[1] == me and comm == "serf":
            out.append(int(pid))
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ClusterNode]]:
    """Nodes ``a`` and ``b`` (regions r-a and r-b), shared by the two tests below: the
    killed agent (which ends with both joined again), then the drain (which ends ``a``).
    Both start from a converged pair, as on a fresh one."""
    yield from started_cluster(["a", "b"], tmp_path_factory.mktemp("pair"))


@pytest.mark.slow
async def test_a_killed_agent_is_restarted_and_the_node_serves_meanwhile(
        pair: list[ClusterNode], http: aiohttp.ClientSession) -> None:
    a, b = pair

    async def joined() -> bool:
        for n in (a, b):
            body = await _cluster(http, n)
            states = {k: m["state"] for k, m in _members(body).items()}
            if body["cluster"] != "ok" or states != {"a": "alive", "b": "alive"}:
                return False
        return True

    assert await _until(joined, 20), [await _cluster(http, n) for n in (a, b)]
    async with http.post(f"{a.url}/api/sessions", json={"lesson_id": "r1"}) as r:
        assert r.status == 201, await r.text()
        session = (await r.json())["session_id"]

    async def frames_out() -> int:
        async with http.get(f"{a.url}/api/sessions/{session}") as r:
            assert r.status == 200, await r.text()
            return int((await r.json())["stats"]["frames_out"])

    old, = _serf_children(a.proc.pid)

    async def ticked_since(n: int) -> int:
        return await _until(lambda: _more(frames_out(), n), 5)

    before = await ticked_since(0)
    os.kill(old, signal.SIGKILL)

    async def degraded() -> dict[str, Any] | None:
        body = await _cluster(http, a)
        return body if body["cluster"] == "degraded" and "error" in body else None

    body = await _until(degraded, 5)
    assert body, await _cluster(http, a)
    assert "serf agent" in body["error"] or "connection" in body["error"], body
    async with http.get(f"{a.url}/ready") as r:
        assert r.status == 200 and (await r.json())["cluster"] == "degraded"
    # The outage, as the others see it: A failed in B's view, or A's agent simply gone.
    b_view = _members(await _cluster(http, b))
    assert b_view["a"]["state"] == "failed" or old not in _serf_children(a.proc.pid)
    during = await ticked_since(before)  # the lesson keeps ticking meanwhile
    assert during > before
    assert (await _cluster(http, a))["cluster"] == "degraded"  # still in the outage

    assert await _until(joined, 20), [await _cluster(http, n) for n in (a, b)]
    new, = _serf_children(a.proc.pid)
    assert new != old
    assert await ticked_since(during) > during
    async with http.get(f"{a.url}/ready") as r:
        ready = await r.json()
        assert r.status == 200 and ready["cluster"] == "ok", ready
    async with http.get(f"{a.url}/metrics") as r:
        m = re.search(r"^cluster_agent_restarts_total (\S+)$", await r.text(), re.MULTILINE)
    assert m is not None and float(m.group(1)) >= 1


@pytest.mark.slow
async def test_drain_in_a_cluster_tags_moves_leaves_and_exits_0(
        pair: list[ClusterNode], http: aiohttp.ClientSession) -> None:
    """POST drain on A: B sees A draining within the gossip's delay while A's lesson
    plays out; A's WebSocket client gets ``closed`` ``moved``; A leaves (B lists it
    ``left``, not ``failed``) and exits 0. (Here, not in tests/test_drain.py, for the
    pair it shares with the test above.)"""
    a, b = pair

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
        status, body = await post_drain(http, a.url)
        assert (status, body) == (202, {"draining": True, "drain_timeout_s": 30.0})

        async def seen_draining() -> dict[str, Any] | None:
            member = _members(await _cluster(http, b)).get("a")
            return member if member and member["draining"] else None

        member = await _until(seen_draining, 10.0)  # printed below: ~1 s here
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
        status, again = await post_drain(http, a.url)
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


async def test_single_node_reports_itself(make_node: NodeFactory,
                                          http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none", region="eu-west", max_streams=8)
    assert node.cluster is None and not _serf_children()
    async with http.get(f"{node.url}/api/cluster") as r:
        body = await r.json()
    assert r.status == 200 and body["cluster"] == "single"
    me = body["node"]
    assert body["members"] == [me]
    assert me["node_id"] == node.engine.node_id and me["state"] == "alive"
    assert me["region"] == "eu-west" and me["capacity"] == 8 and me["free_slots"] == 8
    assert me["url"] == node.url and me["draining"] is False
    async with http.get(f"{node.url}/ready") as r:
        assert (await r.json())["cluster"] == "single"


async def test_api_cluster_needs_the_key(make_node: NodeFactory,
                                         http: aiohttp.ClientSession) -> None:
    node = await make_node(model="none", api_key="k" * 20)
    async with http.get(f"{node.url}/api/cluster") as r:
        assert r.status == 401
    async with http.get(f"{node.url}/api/cluster",
                        headers={"Authorization": f"Bearer {'k' * 20}"}) as r:
        assert r.status == 200


@pytest.mark.parametrize(("settings", "key"), [
    ({"join": "10.0.0.1"}, "join"),
    ({"join": "node-a:7946"}, "join"),
    ({"join": "10.0.0.1:99999"}, "join"),
    ({"join": " , "}, "join"),
    ({"cluster_bind": "127.0.0.1"}, "cluster_bind"),
    ({"join": "10.0.0.1:7946"}, "cluster_key_file"),
    ({"join": "10.0.0.1:7946", "cluster_key_file": "/nonexistent/keyring.json"},
     "cluster_key_file"),
    ({"node_location": "91,0"}, "node_location"),
    ({"node_location": "52.3"}, "node_location"),
    ({"node_version": "1 0"}, "node_version"),
    ({"cluster_bind": "127.0.0.1:65535"}, "cluster_rpc_port"),
])
def test_bad_cluster_settings_are_refused(settings: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        Config.load(env={}, overrides=settings)


def test_cluster_settings_defaults_and_derived(tmp_path: Path) -> None:
    c = Config.load(env={})
    assert c.join_addresses() == () and c.rpc_port() == 7947 and c.location() is None
    keyring = write_keyring(tmp_path / "k.json")
    c = Config.load(env={"RAPIDO_JOIN": "10.0.0.1:7946, [::1]:7000",
                         "RAPIDO_CLUSTER_KEY_FILE": str(keyring),
                         "RAPIDO_NODE_LOCATION": "52.37,4.9",
                         "RAPIDO_CLUSTER_RPC_PORT": "7400"})
    assert c.join_addresses() == ("10.0.0.1:7946", "[::1]:7000")
    assert c.rpc_port() == 7400 and c.location() == (52.37, 4.9)


def test_cli_refuses_a_bad_join_address_with_exit_2(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "rapido", "serve", "--join", "nowhere"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2, run.stdout + run.stderr
    assert "join:" in run.stderr + run.stdout


@pytest.mark.parametrize(("settings", "key"), [
    ({"cluster_url": "ftp://10.0.0.5:8080"}, "cluster_url"),
    ({"cluster_url": "http://10.0.0.5:8080/api"}, "cluster_url"),
    ({"cluster_url": "http://user@10.0.0.5"}, "cluster_url"),
    ({"cluster_url": "http://"}, "cluster_url"),
    ({"host": "0.0.0.0", "api_key": "k" * 32}, "cluster_url"),
])
def test_bad_cluster_urls_are_refused(settings: dict[str, str], key: str,
                                      tmp_path: Path) -> None:
    keyring = write_keyring(tmp_path / "k.json")
    with pytest.raises(ConfigError, match=f"^{key}: "):
        Config.load(env={}, overrides={"join": "10.0.0.1:7946",
                                       "cluster_key_file": str(keyring), **settings})
    ok = Config.load(env={}, overrides={"join": "10.0.0.1:7946", "host": "0.0.0.0",
                                        "api_key": "k" * 32, "cluster_key_file": str(keyring),
                                        "cluster_url": "http://10.0.0.5:8080/"})
    assert ok.cluster_url == "http://10.0.0.5:8080/"
