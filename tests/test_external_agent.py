"""``serf_rpc``: a node using a Serf agent the operator runs (a real ``serf agent``
process started here from a JSON config file, as ``systemd/rapido-serf@.service`` does)
instead of starting its own: tags, joins, the agent's death and return, a graceful leave
that ends the agent, refusals (another name, a wrong token, nothing listening) and
settings."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rapido.cluster.agent import SerfAgentConfigError, SerfAgentError
from rapido.cluster.external import (
    ExternalAgentSettings,
    ExternalSerfAgent,
    check_rpc_addr,
    read_rpc_auth,
)
from rapido.cluster.serf import SerfClient, SerfError
from rapido.config import Config, ConfigError
from tests.conftest import REPO, NodeFactory, system_tool
from tests.test_cluster import _cluster, _members, _serf_children, _until
from tests.test_serf import free_port, write_keyring


@dataclass
class OperatorAgent:
    """A ``serf agent`` as an operator runs it: its own process, its own config file."""

    name: str
    config: Path  # also what serf_rpc_auth_file points at (its rpc_auth)
    bind: str
    rpc: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([system_tool("serf"), "agent",
                                      f"-config-file={self.config}"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    async def answering(self) -> None:
        token = json.loads(self.config.read_text())["rpc_auth"]
        for _ in range(200):
            try:
                client = await SerfClient.connect(self.rpc, token, timeout_s=1)
            except SerfError:
                await asyncio.sleep(0.05)
                continue
            await client.aclose()
            return
        raise AssertionError(f"serf agent {self.name} never answered at {self.rpc}")


AgentFactory = Callable[..., OperatorAgent]


@pytest.fixture
async def operator_agent(tmp_path: Path) -> AsyncIterator[AgentFactory]:
    system_tool("serf")
    agents: list[OperatorAgent] = []

    def make(name: str, keyring: Path) -> OperatorAgent:
        bind, rpc = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = tmp_path / f"serf-{name}.json"
        config.write_text(json.dumps({
            "node_name": name, "bind": bind, "rpc_addr": rpc,
            "rpc_auth": secrets.token_urlsafe(24), "keyring_file": str(keyring),
            "profile": "lan", "leave_on_terminate": True, "log_level": "warn"}))
        config.chmod(0o600)
        agent = OperatorAgent(name, config, bind, rpc)
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
        if a.proc is not None:
            a.proc.wait(timeout=30)


def _own_node(keyring: Path) -> dict[str, Any]:
    bind = f"127.0.0.1:{free_port()}"
    return {"model": "none", "node_id": "own", "join": bind, "cluster_bind": bind,
            "cluster_rpc_port": free_port(), "cluster_key_file": str(keyring)}


@pytest.mark.slow
async def test_a_node_uses_the_agent_it_is_given_and_never_spawns_one(
        make_node: NodeFactory, operator_agent: AgentFactory, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    keyring = write_keyring(tmp_path / "keyring.json")
    agent = operator_agent("ext1", keyring)
    agent.start()
    await agent.answering()
    assert agent.proc is not None
    own = await make_node(**_own_node(keyring))
    assert own.cluster is not None and own.cluster.agent is not None
    own_agent = own.cluster.agent.pid
    assert own_agent is not None
    x = await make_node(model="none", node_id="ext1", serf_rpc=agent.rpc,
                        serf_rpc_auth_file=str(agent.config), join=own.config.cluster_bind)
    assert x.cluster is not None and x.cluster.external
    assert x.cluster.agent is not None and x.cluster.agent.pid is None
    assert sorted(_serf_children()) == sorted([agent.proc.pid, own_agent])

    async def converged() -> bool:
        for n in (own, x):
            body = await _cluster(http, n.url)
            seen = {k: (m["state"], m["url"]) for k, m in _members(body).items()}
            if body["cluster"] != "ok" or seen != {"ext1": ("alive", x.url),
                                                   "own": ("alive", own.url)}:
                return False
        return True

    assert await _until(converged, 20), [await _cluster(http, n.url) for n in (own, x)]

    # The agent dies: the node serves on, degraded, and does not start one itself.
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=10)

    async def degraded() -> dict[str, Any] | None:
        body = await _cluster(http, x.url)
        return body if body["cluster"] == "degraded" and "error" in body else None

    body = await _until(degraded, 10)
    assert body, await _cluster(http, x.url)
    assert agent.rpc in body["error"], body["error"]
    async with http.get(f"{x.url}/ready") as r:
        assert r.status == 200 and (await r.json())["cluster"] == "degraded"
    await asyncio.sleep(2.5)  # a reconnect or two, refused
    assert _serf_children() == [own_agent], "the node must not start an agent of its own"
    assert x.cluster.restarts >= 1
    assert "reconnecting to the serf agent" in (x.cluster.error or ""), x.cluster.error

    # The operator (systemd) starts it again: the node reconnects, writes its tags and
    # joins again.
    agent.start()
    assert await _until(converged, 40), [await _cluster(http, n.url) for n in (own, x)]

    # A graceful stop: the node asks the agent to leave; it leaves and exits by itself.
    await x.stop()
    assert await asyncio.get_running_loop().run_in_executor(
        None, lambda: agent.proc.wait(timeout=20) if agent.proc else None) == 0

    async def left() -> bool:
        return _members(await _cluster(http, own.url))["ext1"]["state"] == "left"

    assert await _until(left, 10), await _cluster(http, own.url)


@pytest.mark.slow
async def test_an_agent_with_another_name_or_token_is_refused(
        make_node: NodeFactory, operator_agent: AgentFactory, tmp_path: Path) -> None:
    agent = operator_agent("ext2", write_keyring(tmp_path / "keyring.json"))
    agent.start()
    await agent.answering()
    with pytest.raises(SerfAgentConfigError, match=r"named 'ext2', not 'other'.*node_id"):
        await make_node(model="none", node_id="other", serf_rpc=agent.rpc,
                        serf_rpc_auth_file=str(agent.config))
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    with pytest.raises(SerfAgentConfigError, match="refused our RPC token"):
        await make_node(model="none", node_id="ext2", serf_rpc=agent.rpc,
                        serf_rpc_auth_file=str(wrong))
    # The CLI: a configuration error, exit 2 (systemd does not restart it), one clear line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAPIDO_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rapido", "serve", "--port", "0", "--model", "none",
        "--node-id", "other", "--serf-rpc", agent.rpc,
        "--serf-rpc-auth-file", str(agent.config),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**env, "PYTHONPATH": str(REPO)})
    async with asyncio.timeout(60):
        out_b, err_b = await proc.communicate()
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 2, out + err
    assert "named 'ext2', not 'other'" in err, err
    assert "Traceback" not in err
    assert agent.proc is not None and agent.proc.poll() is None, "refusing leaves it be"


async def test_nothing_listening_is_an_error_after_the_start_timeout() -> None:
    agent = ExternalSerfAgent(ExternalAgentSettings(
        node="n1", rpc_addr=f"127.0.0.1:{free_port()}", start_timeout_s=0.3))
    with pytest.raises(SerfAgentError, match=r"no serf agent answers at 127\.0\.0\.1:"):
        await agent.start()


def test_rpc_auth_file_plain_or_the_agents_config(tmp_path: Path) -> None:
    plain = tmp_path / "token"
    plain.write_text("s3cret-token\n")
    assert read_rpc_auth(plain) == "s3cret-token"
    config = tmp_path / "serf.json"
    config.write_text(json.dumps({"node_name": "n", "rpc_auth": "from-config"}))
    assert read_rpc_auth(config) == "from-config"
    for text, message in (("", "one line"), ("two\nlines\n", "one line"),
                          ('{"node_name": "n"}', "without rpc_auth"),
                          ("{not json", "not a JSON object"),
                          ('{"rpc_auth": 7}', "one line")):
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(SerfAgentConfigError, match=message):
            read_rpc_auth(bad)
    with pytest.raises(SerfAgentConfigError, match="cannot read"):
        read_rpc_auth(tmp_path / "missing")
    assert check_rpc_addr("[::1]:7373") == ("::1", 7373)


@pytest.mark.parametrize(("settings", "key", "says"), [
    ({"serf_rpc": "10.0.0.1:7373"}, "serf_rpc", "not a loopback address"),
    ({"serf_rpc": "localhost:7373"}, "serf_rpc", "not an IP address"),
    ({"serf_rpc": "127.0.0.1"}, "serf_rpc", "host:port"),
    ({"serf_rpc": "127.0.0.1:7373", "cluster_key_file": "/etc/k.json"},
     "cluster_key_file", "not with serf_rpc"),
    ({"serf_rpc": "127.0.0.1:7373", "cluster_bind": "10.0.0.1:7946"},
     "cluster_bind", "not with serf_rpc"),
    ({"serf_rpc": "127.0.0.1:7373", "cluster_rpc_port": 7400},
     "cluster_rpc_port", "not with serf_rpc"),
    ({"serf_rpc_auth_file": "/etc/rapido/serf@0.json"}, "serf_rpc_auth_file",
     "only with serf_rpc"),
    ({"serf_rpc": "127.0.0.1:7373", "serf_rpc_auth_file": "/nonexistent/token"},
     "serf_rpc_auth_file", "cannot read"),
])
def test_bad_serf_rpc_settings_are_refused(settings: dict[str, Any], key: str,
                                           says: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: .*{says}"):
        Config.load(env={}, overrides=settings)


def test_serf_rpc_settings(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    c = Config.load(env={"RAPIDO_SERF_RPC": "127.0.0.1:7373",
                         "RAPIDO_SERF_RPC_AUTH_FILE": str(token),
                         "RAPIDO_JOIN": "10.0.0.2:7946"})
    # No keyring needed: the agent has its own.
    assert c.clustered and c.serf_rpc_auth() == "abc" and c.cluster_key_file == ""
    alone = Config.load(env={"RAPIDO_SERF_RPC": "[::1]:7373"})
    assert alone.clustered and alone.join_addresses() == () and alone.serf_rpc_auth() is None
    assert not Config.load(env={}).clustered
    assert c.redacted()["serf_rpc_auth_file"] == str(token)  # a path, not a secret
