"""The Serf RPC client and the agent process, against real `serf agent`s on loopback;
the malformed-answer cases against a fake RPC server on a real loopback socket."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from rapido.cluster.agent import (
    SerfAgent,
    SerfAgentConfigError,
    SerfAgentError,
    SerfAgentSettings,
    read_keyring,
)
from rapido.cluster.serf import (
    Member,
    MemberEvent,
    QueryAck,
    QueryEvent,
    QueryResponse,
    SerfAuthError,
    SerfClient,
    SerfCommandError,
    SerfConnectionError,
    SerfProtocolError,
    SerfStreamOverflow,
    SerfTimeoutError,
    UserEvent,
)
from tests.conftest import REPO, system_tool

AgentFactory = Callable[..., Awaitable[SerfAgent]]


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (gossip uses both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def write_keyring(path: Path, keys: list[bytes] | None = None) -> Path:
    path.write_text(json.dumps([base64.b64encode(k).decode()
                                for k in (keys or [os.urandom(32)])]))
    return path


@pytest.fixture
def keyring(tmp_path: Path) -> Path:
    return write_keyring(tmp_path / "keyring.json")


@pytest.fixture
async def make_agent(tmp_path: Path, keyring: Path) -> AsyncIterator[AgentFactory]:
    """Real agents on loopback, sharing one keyring unless told otherwise; all stopped
    (without the graceful leave: fast) after the test."""
    binary = system_tool("serf")
    agents: list[SerfAgent] = []

    async def factory(node: str, **overrides: Any) -> SerfAgent:
        settings = SerfAgentSettings(
            node=node, bind=f"127.0.0.1:{free_port()}", rpc_port=free_port(),
            keyring_file=keyring, binary=binary, stop_timeout_s=4.0)
        agent = SerfAgent(dataclasses.replace(settings, **overrides))
        await agent.start()
        agents.append(agent)
        return agent

    yield factory
    await asyncio.gather(*(a.aclose(leave=False) for a in agents))


def rpc(agent: SerfAgent) -> SerfClient:
    assert agent.client is not None
    return agent.client


async def cluster(make_agent: AgentFactory, n: int, **kw: Any) -> list[SerfAgent]:
    agents = [await make_agent(f"node{i}", **kw) for i in range(n)]
    for agent in agents[1:]:
        assert await rpc(agent).join([agents[0].settings.bind]) == 1
    return agents


async def until(probe: Callable[[], Awaitable[Any]], timeout_s: float = 10.0,
                every_s: float = 0.1) -> Any:
    """Poll ``probe`` until it returns something true; its last value otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every_s)


def by_name(members: list[Member]) -> dict[str, Member]:
    return {m.name: m for m in members}


# ------------------------------------------------------------------ real agents


async def test_handshake_and_auth(make_agent: AgentFactory) -> None:
    agent = await make_agent("solo", rpc_auth="right-token")
    async with await SerfClient.connect(agent.rpc_addr, "right-token") as client:
        assert (await client.stats())["agent"]["name"] == "solo"
    with pytest.raises(SerfAuthError, match="Invalid authentication token"):
        await SerfClient.connect(agent.rpc_addr, "wrong-token")
    async with await SerfClient.connect(agent.rpc_addr) as anonymous:
        with pytest.raises(SerfAuthError, match="Authentication required"):
            await anonymous.members()
    with pytest.raises(SerfConnectionError, match="cannot connect"):
        await SerfClient.connect(f"127.0.0.1:{free_port()}")


async def test_three_agents_see_each_other(make_agent: AgentFactory) -> None:
    agents = await cluster(make_agent, 3, tags={"role": "media"})
    for agent in agents:
        seen = await until(lambda a=agent: _all_alive(a, 3))  # type: ignore[misc]
        assert seen, await rpc(agent).members()
        members = by_name(await rpc(agent).members())
        for other in agents:
            m = members[other.settings.node]
            assert (m.addr, m.port) == ("127.0.0.1", int(other.settings.bind.split(":")[1]))
            assert m.tags == {"role": "media"}
    filtered = await rpc(agents[0]).members_filtered(name="node[12]", status="alive")
    assert sorted(m.name for m in filtered) == ["node1", "node2"]


async def _all_alive(agent: SerfAgent, n: int) -> bool:
    members = await rpc(agent).members()
    return sum(m.status == "alive" for m in members) == n


async def test_tag_change_is_seen_by_the_other_agent(make_agent: AgentFactory) -> None:
    a, b = await cluster(make_agent, 2, tags={"role": "media", "zone": "z1"})
    updates = await rpc(b).stream(["member-update"])
    await rpc(a).tags({"load": "0.42"}, delete=["zone"])

    async def tags_on_b() -> bool:
        return by_name(await rpc(b).members())["node0"].tags == {"role": "media",
                                                                 "load": "0.42"}
    assert await until(tags_on_b)
    async with asyncio.timeout(10):
        event = await anext(updates)
    assert isinstance(event, MemberEvent) and event.type == "member-update"
    assert event.members[0].name == "node0"
    await updates.stop()
    big = {"big": "v" * 490}  # fits alone, not with the tags node0 has
    with pytest.raises(ValueError, match="512"):
        await rpc(a).tags(big)


async def test_user_event_reaches_another_agents_stream(make_agent: AgentFactory) -> None:
    a, b = await cluster(make_agent, 2)
    async with await rpc(b).stream(["user"]) as events:
        await rpc(a).event("lesson-moved", b"\x00\xffpayload", coalesce=False)
        async with asyncio.timeout(10):
            event = await anext(events)
    assert isinstance(event, UserEvent)
    assert event == UserEvent(name="lesson-moved", payload=b"\x00\xffpayload",
                              ltime=event.ltime, coalesce=False)
    with pytest.raises(ValueError, match="512"):
        await rpc(a).event("big", b"x" * 480)


async def test_query_gets_a_response_from_another_agent(make_agent: AgentFactory) -> None:
    a, b = await cluster(make_agent, 2)
    responder = await b.connect()  # respond goes on the connection that streamed it
    queries = await responder.stream(["query"])
    asked: list[QueryEvent] = []

    async def answer() -> None:
        async for q in queries:
            assert isinstance(q, QueryEvent)
            asked.append(q)
            await responder.respond(q.id, b"load=" + q.payload)

    task = asyncio.create_task(answer(), name="test-responder")
    try:
        # 3 s: the answer goes agent -> this loop -> agent -> agent, on a shared machine.
        query = await rpc(a).query("load?", b"7", timeout_s=3.0, request_ack=True)
        records = await query.collect()
    finally:
        await queries.stop()
        await task
        await responder.aclose()
    assert [q.name for q in asked] == ["load?"]
    assert QueryAck("node0") in records and QueryAck("node1") in records
    assert QueryResponse("node1", b"load=7") in records
    with pytest.raises(ValueError, match="1024"):
        await rpc(a).query("big", b"x" * 1100, timeout_s=1)
    with pytest.raises(ValueError, match="timeout"):
        await rpc(a).query("no-timeout", b"", timeout_s=0)
    with pytest.raises(SerfCommandError, match="No pending queries"):
        await rpc(b).respond(424242, b"late")


async def test_get_coordinate(make_agent: AgentFactory) -> None:
    a, _ = await cluster(make_agent, 2)
    coord = await until(lambda: rpc(a).get_coordinate("node1"))
    assert coord is not None and len(coord.vec) == 8 and coord.error >= 0
    assert await rpc(a).get_coordinate("nobody") is None


@pytest.mark.slow
async def test_leave_shows_left_on_the_other(make_agent: AgentFactory) -> None:
    a, b = await cluster(make_agent, 2)
    await b.aclose()  # the graceful leave, then the agent exits on its own
    assert b.returncode == 0
    status = await until(lambda: _status(a, "node1", "left"))
    assert status, await rpc(a).members()


async def _status(agent: SerfAgent, node: str, want: str) -> bool:
    return by_name(await rpc(agent).members())[node].status == want


@pytest.mark.slow
async def test_killed_agent_shows_failed(make_agent: AgentFactory) -> None:
    a, b, c = await cluster(make_agent, 3)
    assert await until(lambda: _all_alive(a, 3))
    assert c.pid is not None
    os.kill(c.pid, signal.SIGKILL)
    started = time.monotonic()
    failed = await until(lambda: _status(a, "node2", "failed"), timeout_s=15, every_s=0.2)
    assert failed, await rpc(a).members()
    assert time.monotonic() - started < 15
    assert await until(lambda: _status(b, "node2", "failed"), timeout_s=5)


async def test_wrong_encryption_key_cannot_join(make_agent: AgentFactory,
                                                tmp_path: Path) -> None:
    a = await make_agent("node0")
    stranger = await make_agent(
        "stranger", keyring_file=write_keyring(tmp_path / "other.json"))
    with pytest.raises(SerfCommandError, match="No installed keys could decrypt"):
        await rpc(stranger).join([a.settings.bind])
    assert [m.name for m in await rpc(a).members()] == ["node0"]
    assert [m.name for m in await rpc(stranger).members()] == ["stranger"]


@pytest.mark.slow
async def test_agent_dies_with_its_parent(tmp_path: Path) -> None:
    """kill -9 of the process that started the agent takes the agent with it."""
    binary = system_tool("serf")
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio, sys\n"
        "from rapido.cluster.agent import SerfAgent, SerfAgentSettings\n"
        "async def main():\n"
        "    agent = SerfAgent(SerfAgentSettings(node='orphan', bind=sys.argv[1],\n"
        "                                        rpc_port=int(sys.argv[2]), binary=sys.argv[3]))\n"
        "    await agent.start()\n"
        "    print(agent.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    parent = await asyncio.create_subprocess_exec(
        sys.executable, str(script), f"127.0.0.1:{free_port()}", str(free_port()), binary,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(20):
            line = await parent.stdout.readline()
        child = int(line)
        assert "serf" in Path(f"/proc/{child}/cmdline").read_text()
        assert _alive(child)
    finally:
        parent.kill()
        await parent.wait()
    gone = await until(lambda: _async(not _alive(child)), timeout_s=5, every_s=0.05)
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone, f"serf agent {child} outlived its parent"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _async(value: bool) -> bool:
    return value


async def test_agent_start_failure_is_reported(make_agent: AgentFactory) -> None:
    a = await make_agent("node0")
    clash = SerfAgent(SerfAgentSettings(node="clash", bind=a.settings.bind,
                                        rpc_port=free_port(), binary=system_tool("serf"),
                                        start_timeout_s=5))
    with pytest.raises(SerfAgentError, match="exited"):
        await clash.start()
    assert clash.returncode is not None
    # Another agent already answers on the RPC port: refused, not mistaken for ours.
    twin = SerfAgent(SerfAgentSettings(node="twin", bind=f"127.0.0.1:{free_port()}",
                                       rpc_port=a.settings.rpc_port,
                                       binary=system_tool("serf"), start_timeout_s=5))
    with pytest.raises(SerfAgentError, match="another agent holds that port"):
        await twin.start()


# --------------------------------------------------------------- settings checks


@pytest.mark.parametrize("bind", ["localhost:7946", "127.0.0.1", "127.0.0.1:0",
                                  "127.0.0.1:70000", "::1:7946", "[127.0.0.1]:7946",
                                  "300.1.1.1:7946", ""])
def test_bad_bind_address(bind: str) -> None:
    with pytest.raises(SerfAgentConfigError, match="bind address"):
        SerfAgent(SerfAgentSettings(node="n", bind=bind, rpc_port=7373))


def test_good_bind_addresses() -> None:
    for bind in ("127.0.0.1:7946", "[::1]:7946", "0.0.0.0:1"):
        SerfAgent(SerfAgentSettings(node="n", bind=bind, rpc_port=7373))


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read"),
    ("directory", "cannot read"),
    ("{not json", "not JSON"),
    ('{"a": 1}', "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ("[42]", "key 0 is not a string"),
    ('["not base64!"]', "key 0 is not base64"),
    (json.dumps([base64.b64encode(b"x" * 32).decode(), base64.b64encode(b"short").decode()]),
     "key 1 has 5 bytes"),
])
def test_bad_keyring_file(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "keyring.json"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SerfAgentConfigError, match=message):
        SerfAgent(SerfAgentSettings(node="n", bind="127.0.0.1:7946", rpc_port=7373,
                                    keyring_file=path))


def test_keyring_of_every_key_size(tmp_path: Path) -> None:
    keys = [os.urandom(n) for n in (16, 24, 32)]
    assert read_keyring(write_keyring(tmp_path / "k.json", keys)) == keys


@pytest.mark.parametrize("overrides", [
    {"node": ""}, {"node": "has space"}, {"rpc_port": 0}, {"profile": "fast"},
    {"tags": {"k": "v" * 600}}, {"rpc_auth": ""}, {"snapshot": Path("/nonexistent/dir/s")},
    {"reconnect_interval_s": 0}, {"reconnect_interval_s": True},
    {"reconnect_interval_s": "5s"}, {"reconnect_interval_s": 7200},
])
def test_bad_settings(overrides: dict[str, Any]) -> None:
    base: dict[str, Any] = {"node": "n", "bind": "127.0.0.1:7946", "rpc_port": 7373}
    with pytest.raises(SerfAgentConfigError):
        SerfAgent(SerfAgentSettings(**{**base, **overrides}))


async def test_reconnect_interval_goes_to_the_config_file(make_agent: AgentFactory) -> None:
    """Serf's reconnect_interval (a Go duration) is written only when set; the agent
    accepts it (its effect: tests/test_cluster_faults.py, a partition heals)."""
    base = SerfAgentSettings(node="n", bind="127.0.0.1:7946", rpc_port=7373)
    for seconds, expected in ((None, None), (2.5, "2500ms"), (30, "30000ms")):
        agent = SerfAgent(dataclasses.replace(base, reconnect_interval_s=seconds))
        try:
            config = json.loads(agent._write_config().read_text())
        finally:
            agent._remove_dir()
        assert config.get("reconnect_interval") == expected
    agent = await make_agent("quick", reconnect_interval_s=0.5)
    assert agent.returncode is None


async def test_secrets_stay_off_the_command_line(make_agent: AgentFactory,
                                                 keyring: Path) -> None:
    agent = await make_agent("secretive", rpc_auth="do-not-show-me")
    cmdline = Path(f"/proc/{agent.pid}/cmdline").read_text()
    assert "do-not-show-me" not in cmdline
    assert json.loads(keyring.read_text())[0] not in cmdline
    assert "-profile=lan" in cmdline.split("\0")


# ------------------------------------------------- malformed answers (fake server)

BODY_COMMANDS = {"handshake", "auth", "members-filtered", "tags", "stream", "monitor",
                 "event", "query", "respond", "join", "force-leave", "stop",
                 "get-coordinate"}

Script = Callable[[str, int], bytes | None]


def pack(*objs: Any) -> bytes:
    return b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)


def ok(seq: int) -> dict[str, Any]:
    return {"Seq": seq, "Error": ""}


MEMBER = {"Name": "x", "Addr": b"\x7f\x00\x00\x01", "Port": 7946, "Tags": {},
          "Status": "alive"}


@pytest.fixture
async def fake_agent() -> AsyncIterator[Callable[[Script], Awaitable[SerfClient]]]:
    """A real socket speaking scripted msgpack: the handshake is answered, every other
    command gets what ``script(command, seq)`` returns (None: silence; b"": close)."""
    servers: list[asyncio.Server] = []
    clients: list[SerfClient] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def start(script: Script) -> SerfClient:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            unpacker = msgpack.Unpacker(raw=False)
            header: dict[str, Any] | None = None
            try:
                while data := await reader.read(4096):
                    unpacker.feed(data)
                    for obj in unpacker:
                        if header is None:
                            header = obj
                            if header["Command"] in BODY_COMMANDS:
                                continue
                        command, seq, header = header["Command"], header["Seq"], None
                        answer = pack(ok(seq)) if command == "handshake" else \
                            script(command, seq)
                        if answer == b"":
                            writer.close()
                            return
                        if answer is not None:
                            writer.write(answer)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        client = await SerfClient.connect(f"127.0.0.1:{port}", timeout_s=0.5)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for server in servers:
        server.close()
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for server in servers:
        await server.wait_closed()


@pytest.mark.parametrize(("answer", "error", "message"), [
    (lambda s: b"\xc1\xc1", SerfProtocolError, "undecodable"),
    (lambda s: pack(ok(s), {"Members": [{"Name": "x"}]}), SerfProtocolError,
     "'Port' missing"),
    (lambda s: pack(ok(s), {"Members": [{**MEMBER, "Addr": "127.0.0.1"}]}),
     SerfProtocolError, "not an IP address"),
    (lambda s: pack(ok(s), {"Members": [{**MEMBER, "Port": "7946"}]}), SerfProtocolError,
     "'Port' has the wrong type"),
    (lambda s: pack(ok(s), {"Members": [{**MEMBER, "Status": "zombie"}]}),
     SerfProtocolError, "unknown status"),
    (lambda s: pack(ok(s), {"Members": [{**MEMBER, "Tags": {"k": 1}}]}), SerfProtocolError,
     "map of strings"),
    (lambda s: pack(ok(s), [1, 2, 3]), SerfProtocolError, "expected a map"),
    (lambda s: pack({"Seq": s}), SerfProtocolError, "malformed answer header"),
    (lambda s: pack({"Seq": s + 99, "Error": ""}), SerfProtocolError, "no command was sent"),
    (lambda s: pack({"Members": []}), SerfProtocolError, "without a header"),
    (lambda s: pack(ok(s), ok(s)), SerfProtocolError, "without its body"),
    (lambda s: pack({"Seq": s, "Error": "agent is sad"}), SerfCommandError, "agent is sad"),
    (lambda s: b"", SerfConnectionError, "closed the connection"),
    (lambda s: None, SerfTimeoutError, "no answer"),
])
async def test_malformed_answers_fail_the_call(
        fake_agent: Callable[[Script], Awaitable[SerfClient]],
        answer: Callable[[int], bytes | None], error: type[Exception], message: str) -> None:
    client = await fake_agent(lambda command, seq: answer(seq))
    with pytest.raises(error, match=message):
        await client.members()


async def test_unknown_seq_fails_every_pending_call(
        fake_agent: Callable[[Script], Awaitable[SerfClient]]) -> None:
    def script(command: str, seq: int) -> bytes | None:
        return pack({"Seq": 1000, "Error": ""}) if command == "stats" else None

    client = await fake_agent(script)
    waiting = asyncio.create_task(client.members(), name="test-members")
    await asyncio.sleep(0.05)
    with pytest.raises(SerfProtocolError, match="seq 1000"):
        await client.stats()
    with pytest.raises(SerfProtocolError, match="seq 1000"):
        await waiting
    assert client.closed
    with pytest.raises(SerfProtocolError):  # later calls fail at once, naming why
        await client.members()


async def test_a_malformed_stream_record_ends_the_stream(
        fake_agent: Callable[[Script], Awaitable[SerfClient]]) -> None:
    def script(command: str, seq: int) -> bytes | None:
        if command == "stream":
            return pack(ok(seq), ok(seq), {"Event": "user", "Name": "e", "LTime": 1},
                        ok(seq), {"Event": "user", "Name": 5, "LTime": 2})
        return pack(ok(seq), {"Members": [MEMBER]})

    client = await fake_agent(script)
    events = await client.stream(["user"])
    assert await anext(events) == UserEvent("e", b"", 1, False)
    with pytest.raises(SerfProtocolError, match="'Name' has the wrong type"):
        await anext(events)
    assert [m.name for m in await client.members()] == ["x"]  # the connection is fine


async def test_a_slow_stream_reader_gets_an_overflow_error(
        fake_agent: Callable[[Script], Awaitable[SerfClient]]) -> None:
    sent: list[str] = []

    def script(command: str, seq: int) -> bytes | None:
        sent.append(command)
        if command == "stream":
            records = [pack(ok(seq), {"Event": "user", "Name": f"e{i}", "LTime": i})
                       for i in range(5)]
            return pack(ok(seq)) + b"".join(records)
        return pack(ok(seq))

    client = await fake_agent(script)
    client.stream_limit = 3
    events = await client.stream(["user"])
    await asyncio.sleep(0.1)  # all five arrive; nobody reads
    names = []
    with pytest.raises(SerfStreamOverflow, match="more than 3 records"):
        async for event in events:
            assert isinstance(event, UserEvent)
            names.append(event.name)
    assert names == ["e0", "e1", "e2"]
    await events.stop()  # the agent is still told to stop
    assert sent == ["stream", "stop"]


async def test_sizes_checked_before_sending(
        fake_agent: Callable[[Script], Awaitable[SerfClient]]) -> None:
    sent: list[str] = []

    def script(command: str, seq: int) -> bytes | None:
        sent.append(command)
        return pack(ok(seq))

    client = await fake_agent(script)
    with pytest.raises(ValueError, match="512"):
        await client.event("e", b"x" * 500)
    with pytest.raises(ValueError, match="1024"):
        await client.query("q", b"x" * 1020, timeout_s=1)
    with pytest.raises(ValueError, match="1024"):
        await client.respond(1, b"x" * 1020)
    with pytest.raises(ValueError, match="512"):
        await client.tags({"k": "v" * 600})
    assert sent == []
    await client.event("e", b"x" * 400)
    assert sent == ["event"]
