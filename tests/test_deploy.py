"""Deployment files: systemd units and their installer, the instance wrapper, the nginx
example, the Grafana dashboard and the GPU bench script.

These checks run the real tools: systemd-analyze and systemctl (Debian package
``systemd``), ``nginx``, ``openssl`` and ``shellcheck``, which
``scripts/install-test-deps.sh`` installs. A missing tool skips its test naming the
package; in CI (RAPIDO_TEST_REQUIRE_SYSTEM_TOOLS=1) it fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from rapido.cluster.agent import read_keyring
from rapido.config import Config
from rapido.metrics import Metrics
from tests.conftest import INSTALL_TEST_DEPS, NodeFactory, system_tool, system_tools

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"
SCRIPTS = REPO / "scripts"
INSTALL = SCRIPTS / "install-systemd.sh"
WRAPPER = SCRIPTS / "rapido-instance"
GPU_BENCH = SCRIPTS / "gpu_bench.sh"
NGINX_CONF = SCRIPTS / "nginx" / "rapido.conf"
DASHBOARD = SCRIPTS / "grafana" / "rapido.json"

SERF_UNIT = UNITS / "rapido-serf@.service"

# Variables the wrapper reads or sets that are not server settings.
WRAPPER_VARS = {"RAPIDO_BASE_PORT", "RAPIDO_BASE_GOSSIP_PORT", "RAPIDO_GOSSIP_PORT",
                "RAPIDO_PYTHON", "RAPIDO_BASE_SERF_RPC_PORT", "RAPIDO_CLUSTER_ADDR"}
CONFIG_VARS = {"RAPIDO_" + name.upper() for name in Config.__dataclass_fields__}


tool = system_tool


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 30,
        ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    if ok:
        assert proc.returncode == 0, (
            f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def install(root: Path, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return run("bash", INSTALL, "--root", root, *args, env=env)


def wants(root: Path, target: str) -> dict[str, str]:
    d = root / "etc/systemd/system" / f"{target}.wants"
    return {p.name: os.readlink(p) for p in d.iterdir()} if d.is_dir() else {}


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of a unit file, in order; keys may repeat."""
    out, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives(path) if s == section and k == key]


def seconds(span: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


# -- the unit files --------------------------------------------------------------------


def test_service_unit_has_what_matters() -> None:
    unit = UNITS / "rapido@.service"
    one = {k: v for s, k, v in directives(unit) if s == "Service"}
    env = values(unit, "Environment")
    assert "CUDA_VISIBLE_DEVICES=%i" in env
    assert values(unit, "EnvironmentFile") == ["/etc/rapido/rapido.env",
                                               "-/etc/rapido/rapido@%i.env"]
    assert one["ExecStart"] == "/opt/rapido/bin/rapido-instance %i"
    assert one["Type"] == "simple"
    assert (one["User"], one["Group"]) == ("rapido", "rapido")
    assert (one["Restart"], one["RestartSec"]) == ("on-failure", "2")
    assert (one["KillSignal"], one["KillMode"]) == ("SIGTERM", "mixed")
    drain = Config().drain_timeout_s
    assert seconds(one["TimeoutStopSec"]) >= drain + 10, "stop timeout must outlast the drain"
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "no", "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "RestrictRealtime": "yes", "RestrictNamespaces": "yes",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "UMask": "0027", "LimitNOFILE": "65536",
        "WorkingDirectory": "/var/lib/rapido", "ReadWritePaths": "/var/lib/rapido",
    }.items():
        assert one.get(key) == value, f"{key}={one.get(key)!r}, want {value!r}"
    assert "rapido" in one["StateDirectory"].split()
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= set(values(unit, "DeviceAllow"))
    state = {e.split("=", 1)[0]: e.split("=", 1)[1] for e in env}
    for name in ("RAPIDO_MODEL_DIR", "RAPIDO_RECORDINGS_DIR", "RAPIDO_AVATARS_DIR"):
        assert state[name].startswith("/var/lib/rapido/"), name
    unknown = {k for k in state if k.startswith("RAPIDO_")} - CONFIG_VARS - WRAPPER_VARS
    assert not unknown, f"not rapido settings: {unknown}"
    assert values(unit, "PartOf", "Unit") == ["rapido.target"]
    assert values(unit, "WantedBy", "Install") == ["rapido.target"]
    target = UNITS / "rapido.target"
    assert values(target, "WantedBy", "Install") == ["multi-user.target"]


def test_serf_unit_is_bound_to_its_node_and_above_the_media_work() -> None:
    one = {k: v for s, k, v in directives(SERF_UNIT) if s == "Service"}
    unit = {k: v for s, k, v in directives(SERF_UNIT) if s == "Unit"}
    # Started before the node, stopped after it (the node asks it to leave, then it
    # exits by itself); stopped and restarted with it.
    assert unit["Before"] == unit["BindsTo"] == unit["PartOf"] == "rapido@%i.service"
    assert one["ExecStart"] == "/usr/bin/serf agent -config-file=/etc/rapido/serf@%i.json"
    assert (one["User"], one["Group"], one["Type"]) == ("rapido", "rapido", "simple")
    assert one["Restart"] == "on-failure"
    # A starved agent flaps: above the node (Nice=0, CPUWeight=100) and its encoders.
    assert int(one["Nice"]) < 0 and int(one["CPUWeight"]) > 100
    assert values(SERF_UNIT, "ReadWritePaths") == ["-/etc/rapido/serf-keyring.json"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "MemoryDenyWriteExecute": "yes"}.items():
        assert one.get(key) == value, f"{key}={one.get(key)!r}, want {value!r}"
    node = {k: v for s, k, v in directives(UNITS / "rapido@.service") if s == "Service"}
    assert "Nice" not in node and "CPUWeight" not in node


def test_env_example_names_only_real_settings() -> None:
    text = (UNITS / "rapido.env.example").read_text()
    names = re.findall(r"^#?(RAPIDO_[A-Z0-9_]+)=", text, re.M)
    assert len(names) > 10
    assert set(names) - CONFIG_VARS - WRAPPER_VARS == set()
    assert not re.search(r"^RAPIDO_PORT=", text, re.M), "the wrapper sets RAPIDO_PORT"
    # Every documented value, uncommented, is a valid configuration.
    documented = dict(re.findall(r"^#?(RAPIDO_[A-Z0-9_]+)=(.*)$", text, re.M))
    Config.load(env={k: v for k, v in documented.items() if v and k in CONFIG_VARS})


# -- the installer -----------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [1, 4])
def test_install_one_instance_per_gpu(tmp_path: Path, gpus: int) -> None:
    out = install(tmp_path, "--gpus", str(gpus)).stdout
    unit_dir = tmp_path / "etc/systemd/system"
    assert set(wants(tmp_path, "rapido.target")) == {f"rapido@{i}.service" for i in range(gpus)}
    assert set(wants(tmp_path, "rapido.target").values()) == {"/etc/systemd/system/rapido@.service"}
    assert wants(tmp_path, "multi-user.target") == {
        "rapido.target": "/etc/systemd/system/rapido.target"}
    assert (unit_dir / "rapido@.service").read_text() == (UNITS / "rapido@.service").read_text()
    assert (unit_dir / "rapido.target").read_text() == (UNITS / "rapido.target").read_text()
    assert not (unit_dir / "rapido@0.service.d").exists(), "GPU hosts need no CPU drop-in"
    wrapper = tmp_path / "opt/rapido/bin/rapido-instance"
    assert wrapper.read_bytes() == WRAPPER.read_bytes()
    assert os.access(wrapper, os.X_OK)
    env = tmp_path / "etc/rapido/rapido.env"
    assert env.read_text() == (UNITS / "rapido.env.example").read_text()
    assert stat.S_IMODE(env.stat().st_mode) == 0o600, "it holds the API key"
    assert f"rapido@{gpus - 1}" in out


def test_install_without_gpu_runs_one_cpu_instance(tmp_path: Path) -> None:
    install(tmp_path, "--gpus", "0")
    assert set(wants(tmp_path, "rapido.target")) == {"rapido@0.service"}
    dropin = tmp_path / "etc/systemd/system/rapido@0.service.d/10-cpu-only.conf"
    env = values(dropin, "Environment")
    assert "CUDA_VISIBLE_DEVICES=" in env and "RAPIDO_DEVICE=cpu" in env


def test_install_is_idempotent_and_follows_the_gpu_count(tmp_path: Path) -> None:
    install(tmp_path, "--gpus", "4")
    env = tmp_path / "etc/rapido/rapido.env"
    env.write_text("RAPIDO_MAX_STREAMS=32\n")
    again = install(tmp_path, "--gpus", "4").stdout
    assert "+ install" not in again, again  # nothing to rewrite
    assert env.read_text() == "RAPIDO_MAX_STREAMS=32\n", "settings are never overwritten"
    assert len(wants(tmp_path, "rapido.target")) == 4

    install(tmp_path, "--gpus", "2")
    assert set(wants(tmp_path, "rapido.target")) == {"rapido@0.service", "rapido@1.service"}
    install(tmp_path, "--gpus", "0")
    assert set(wants(tmp_path, "rapido.target")) == {"rapido@0.service"}
    dropin = tmp_path / "etc/systemd/system/rapido@0.service.d"
    assert dropin.is_dir()
    install(tmp_path, "--gpus", "1")
    assert set(wants(tmp_path, "rapido.target")) == {"rapido@0.service"}
    assert not dropin.exists(), "the CPU drop-in goes once there is a GPU"


def test_install_links_without_systemctl(tmp_path: Path) -> None:
    """Without systemctl the installer makes the same links systemctl enable makes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "sed", "install", "cmp", "stat", "mktemp", "grep", "ln", "mkdir",
                 "rm", "rmdir", "dirname", "ls", "cat", "head", "base64", "tr", "cp"):
        found = shutil.which(name)
        assert found, name
        (bin_dir / name).symlink_to(found)
    env = {**os.environ, "PATH": str(bin_dir)}
    manual, real = tmp_path / "manual", tmp_path / "real"
    install(manual, "--gpus", "3", env=env)
    install(manual, "--gpus", "2", env=env)
    tool("systemctl")
    install(real, "--gpus", "3")
    install(real, "--gpus", "2")
    for target in ("rapido.target", "multi-user.target"):
        assert wants(manual, target) == wants(real, target)
    assert len(wants(manual, "rapido.target")) == 2


def test_install_prefix_dry_run_and_bad_arguments(tmp_path: Path) -> None:
    dry = install(tmp_path / "dry", "--gpus", "2", "--dry-run").stdout
    assert not (tmp_path / "dry").exists(), "a dry run changes nothing"
    assert "+ install" in dry and "enable rapido@0.service rapido@1.service" in dry

    install(tmp_path, "--gpus", "1", "--prefix", "/srv/rapido")
    unit = tmp_path / "etc/systemd/system/rapido@.service"
    assert values(unit, "ExecStart") == ["/srv/rapido/bin/rapido-instance %i"]
    assert (tmp_path / "srv/rapido/bin/rapido-instance").is_file()

    for bad in (["--gpus", "two"], ["--prefix", "relative"], ["--now"], ["--bogus"],
                ["--cluster-addr", "node-a.lan"], ["--cluster-addr", "127.0.0.1"],
                ["--cluster-addr", "10.0.0.5", "--node-name", "-x"],
                ["--keyring", str(tmp_path / "missing.json")]):
        proc = run("bash", INSTALL, "--root", tmp_path / "bad", *bad, ok=False)
        assert proc.returncode == 2, (bad, proc)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _agent_config(root: Path, i: int) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((root / f"etc/rapido/serf@{i}.json").read_text())
    return config


def test_install_cluster_keyring_agent_configs_and_dropins(tmp_path: Path) -> None:
    out = install(tmp_path, "--gpus", "2", "--cluster-addr", "10.0.0.5",
                  "--node-name", "gpu-a").stdout
    conf = tmp_path / "etc/rapido"
    unit_dir = tmp_path / "etc/systemd/system"
    keyring = conf / "serf-keyring.json"
    (key,) = read_keyring(keyring)  # what the node and Serf accept: one 32-byte key
    assert len(key) == 32
    assert stat.S_IMODE(keyring.stat().st_mode) == 0o600
    assert "copy it to the others" in out and "--keyring" in out  # how to share it
    assert (unit_dir / "rapido-serf@.service").is_file()
    tokens = set()
    for i in (0, 1):
        agent = _agent_config(tmp_path, i)
        assert agent["node_name"] == f"gpu-a-{i}"
        assert agent["bind"] == f"10.0.0.5:{7946 + i}"
        assert agent["rpc_addr"] == f"127.0.0.1:{7373 + i}"
        assert agent["keyring_file"] == "/etc/rapido/serf-keyring.json"
        assert agent["leave_on_terminate"] is True and agent["profile"] == "lan"
        tokens.add(agent["rpc_auth"])
        assert stat.S_IMODE((conf / f"serf@{i}.json").stat().st_mode) == 0o640
        dropin = unit_dir / f"rapido@{i}.service.d/20-serf-agent.conf"
        assert values(dropin, "Wants", "Unit") == [f"rapido-serf@{i}.service"]
        env = dict(e.split("=", 1) for e in values(dropin, "Environment"))
        assert env == {"RAPIDO_SERF_RPC": agent["rpc_addr"],
                       "RAPIDO_SERF_RPC_AUTH_FILE": f"/etc/rapido/serf@{i}.json",
                       "RAPIDO_NODE_ID": agent["node_name"]}
        # What the node makes of it (the auth file as staged).
        staged = {**env, "RAPIDO_SERF_RPC_AUTH_FILE": str(conf / f"serf@{i}.json"),
                  "RAPIDO_JOIN": "10.0.0.6:7946"}
        c = Config.load(env=staged)
        assert c.clustered and c.serf_rpc_auth() == agent["rpc_auth"]
    assert len(tokens) == 2, "a token per agent"
    assert len(tokens.pop()) >= 32

    # Again, without the flag: nothing rewritten, the keyring and the tokens kept, the
    # drop-ins follow the agent configs that exist.
    before = {p.name: p.read_bytes() for p in conf.iterdir()}
    again = install(tmp_path, "--gpus", "2").stdout
    assert "+ install" not in again, again
    assert {p.name: p.read_bytes() for p in conf.iterdir()} == before
    # A third GPU: its instance has no agent config until the flag is given again.
    third = install(tmp_path, "--gpus", "3")
    assert "rapido@2 has no Serf agent config" in third.stderr
    assert not (unit_dir / "rapido@2.service.d").exists()
    install(tmp_path, "--gpus", "3", "--cluster-addr", "10.0.0.5", "--node-name", "gpu-a")
    assert _agent_config(tmp_path, 2)["node_name"] == "gpu-a-2"
    assert {p.name: p.read_bytes() for p in conf.iterdir() if p.name in before} == before
    # The agent config gone: its drop-in goes too (the node starts its own agent or none).
    (conf / "serf@1.json").unlink()
    install(tmp_path, "--gpus", "3")
    assert not (unit_dir / "rapido@1.service.d").exists()
    assert (unit_dir / "rapido@0.service.d/20-serf-agent.conf").is_file()


def test_install_takes_the_first_machines_keyring_and_never_overwrites(
        tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    install(first, "--gpus", "1")
    shared = first / "etc/rapido/serf-keyring.json"
    out = install(second, "--gpus", "1", "--keyring", str(shared),
                  "--cluster-addr", "10.0.0.6").stdout
    copy = second / "etc/rapido/serf-keyring.json"
    assert copy.read_bytes() == shared.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert "copy it to the others" not in out
    install(second, "--gpus", "1", "--keyring", str(shared))  # the same: fine
    other = tmp_path / "other.json"
    other.write_text(json.dumps([base64.b64encode(os.urandom(32)).decode()]))
    proc = run("bash", INSTALL, "--root", second, "--gpus", "1", "--keyring", other, ok=False)
    assert proc.returncode == 2 and "never overwritten" in proc.stderr, proc
    assert copy.read_bytes() == shared.read_bytes()
    not_a_keyring = tmp_path / "bad.json"
    not_a_keyring.write_text('{"keys": "nope"}')
    proc = run("bash", INSTALL, "--root", tmp_path / "third", "--keyring", not_a_keyring,
               ok=False)
    assert proc.returncode == 2 and "not a Serf keyring" in proc.stderr, proc
    assert not (tmp_path / "third").exists()


async def test_the_installed_agent_config_runs_serf_for_a_node(
        tmp_path: Path, make_node: NodeFactory, http: aiohttp.ClientSession) -> None:
    """The agent config the installer writes, run by a real `serf agent` as
    rapido-serf@0 runs it, and the node the drop-in configures: it joins through that
    agent, and its graceful stop makes the agent leave and exit 0."""
    from tests.test_serf import free_port

    serf = tool("serf")
    root = tmp_path / "root"
    await asyncio.to_thread(install, root, "--gpus", "1", "--cluster-addr", "10.0.0.5",
                            "--node-name", "n")
    config_file = root / "etc/rapido/serf@0.json"
    agent = _agent_config(root, 0)
    # Loopback ports of this test instead of 10.0.0.5:7946, the keyring as staged.
    rpc = f"127.0.0.1:{free_port()}"
    agent.update(bind=f"127.0.0.1:{free_port()}", rpc_addr=rpc,
                 keyring_file=str(root / "etc/rapido/serf-keyring.json"))
    config_file.write_text(json.dumps(agent))
    dropin = root / "etc/systemd/system/rapido@0.service.d/20-serf-agent.conf"
    env = dict(e.split("=", 1) for e in values(dropin, "Environment"))
    proc = await asyncio.create_subprocess_exec(
        serf, "agent", f"-config-file={config_file}", stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = await make_node(model="none", node_id=env["RAPIDO_NODE_ID"], serf_rpc=rpc,
                               serf_rpc_auth_file=str(config_file))
        async with http.get(f"{node.url}/api/cluster") as r:
            body = await r.json()
        assert body["cluster"] == "ok", body
        assert [m["node_id"] for m in body["members"]] == ["n-0"]
        await node.stop()
        async with asyncio.timeout(20):
            assert await proc.wait() == 0  # it left and exited by itself
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_systemd_analyze_verifies_the_installed_units(tmp_path: Path, gpus: int) -> None:
    analyze = tool("systemd-analyze")
    install(tmp_path, "--gpus", str(gpus), "--cluster-addr", "10.0.0.5")
    # The staging root needs the distribution's units (sysinit.target, ...) to verify
    # dependencies against; ExecStart= is resolved inside the root (the wrapper).
    system = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                   if (p / "sysinit.target").exists()), None)
    assert system, "no systemd unit directory (/usr/lib/systemd/system): install systemd"
    shutil.copytree(system, tmp_path / "usr/lib/systemd/system", symlinks=True)
    # ExecStart= of the agents, resolved inside the root.
    serf = Path(tool("serf"))
    (tmp_path / serf.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(serf, tmp_path / serf.relative_to("/"))
    n = max(gpus, 1)
    names = ([f"rapido@{i}.service" for i in range(n)] + ["rapido.target"]
             + [f"rapido-serf@{i}.service" for i in range(n)])
    proc = run(analyze, "verify", f"--root={tmp_path}", *names, ok=False)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if "rapido" in line]
    assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr
    # The hardening keeps the exposure score "OK" (systemd-analyze security, 0..10).
    sec = run(analyze, "security", "--offline=yes", f"--root={tmp_path}", "--threshold=40",
              "rapido@0.service", ok=False)
    assert sec.returncode == 0, sec.stdout[-2000:] + sec.stderr
    sec = run(analyze, "security", "--offline=yes", f"--root={tmp_path}", "--threshold=20",
              "rapido-serf@0.service", ok=False)
    assert sec.returncode == 0, sec.stdout[-2000:] + sec.stderr


# -- the wrapper -------------------------------------------------------------------------


def test_wrapper_offsets_the_ports_by_instance(tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$RAPIDO_PORT $RAPIDO_GOSSIP_PORT $*"\n'
                    'echo "bind=${RAPIDO_CLUSTER_BIND:-} rpc=${RAPIDO_CLUSTER_RPC_PORT:-}"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAPIDO_")}
    env["RAPIDO_PYTHON"] = str(stub)
    assert run("sh", WRAPPER, "3", env=env).stdout == "8083 7949 -m rapido serve\n" \
        "bind= rpc=7376\n"
    custom = {**env, "RAPIDO_BASE_PORT": "9000", "RAPIDO_BASE_GOSSIP_PORT": "9500",
              "RAPIDO_PORT": "1234", "RAPIDO_CLUSTER_ADDR": "10.0.0.5",
              "RAPIDO_BASE_SERF_RPC_PORT": "9600"}
    proc = run("sh", WRAPPER, "0", "--log-level", "debug", env=custom)
    assert proc.stdout == "9000 9500 -m rapido serve --log-level debug\n" \
        "bind=10.0.0.5:9500 rpc=9600\n"
    # Each instance of a cluster host gossips and answers RPC on ports of its own ...
    assert run("sh", WRAPPER, "2", env={**env, "RAPIDO_CLUSTER_ADDR": "fd00::5"}
               ).stdout.splitlines()[1] == "bind=[fd00::5]:7948 rpc=7375"
    # ... what is set already wins, and an agent of rapido-serf@ takes none of them.
    mine = {**env, "RAPIDO_CLUSTER_ADDR": "10.0.0.5", "RAPIDO_CLUSTER_BIND": "10.0.0.9:1",
            "RAPIDO_CLUSTER_RPC_PORT": "2"}
    assert run("sh", WRAPPER, "1", env=mine).stdout.splitlines()[1] == "bind=10.0.0.9:1 rpc=2"
    external = {**env, "RAPIDO_CLUSTER_ADDR": "10.0.0.5", "RAPIDO_SERF_RPC": "127.0.0.1:7373"}
    assert run("sh", WRAPPER, "1", env=external).stdout.splitlines()[1] == "bind= rpc="
    assert "ignoring RAPIDO_PORT=1234" in proc.stderr
    for bad in ("", "cpu", "01", "-1"):
        proc = run("sh", WRAPPER, bad, env=env, ok=False)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, (bad, proc)
    proc = run("sh", WRAPPER, "1", env={**env, "RAPIDO_BASE_PORT": "65535"}, ok=False)
    assert proc.returncode == 2
    proc = run("sh", WRAPPER, "1", env={**env, "RAPIDO_BASE_SERF_RPC_PORT": "x"}, ok=False)
    assert proc.returncode == 2


def test_wrapper_execs_a_node_that_drains_on_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAPIDO_")}
    env.update(RAPIDO_PYTHON=sys.executable, RAPIDO_BASE_PORT=str(port - 2),
               RAPIDO_MODEL="none", RAPIDO_MODEL_DIR=str(tmp_path / "models"),
               RAPIDO_RECORDINGS_DIR=str(tmp_path / "rec"), RAPIDO_DRAIN_TIMEOUT_S="1",
               RAPIDO_LOG_LEVEL="warning")
    proc = subprocess.Popen(["sh", str(WRAPPER), "2"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
                    assert json.load(r)["ready"] is True
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the node did not come up"
                time.sleep(0.1)
        # exec: the unit's main process is the server itself, so SIGTERM reaches it.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:4] == [b"-m", b"rapido", b"serve"], cmdline
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- nginx -------------------------------------------------------------------------------


def test_nginx_example_passes_nginx_t(tmp_path: Path) -> None:
    nginx, openssl = tool("nginx"), tool("openssl")
    text = NGINX_CONF.read_text()
    flat = " ".join(text.split())
    for must in ("ANY NODE ANSWERS ANY URL", "RAPIDO_CLUSTER_URL", "keepalive 64;",
                 "proxy_next_upstream error timeout;",
                 "map $http_upgrade $connection_upgrade",
                 "proxy_set_header Upgrade $http_upgrade;", "proxy_buffering off;",
                 "client_max_body_size 16m;", "location /ws/", "location /whep/",
                 "location = /health", "X-Forwarded-For", "X-Forwarded-Proto",
                 "X-Forwarded-Host", "proxy_read_timeout 3600s;", "return 301 https://"):
        assert must in flat, must
    assert Config().max_body_bytes == 16 * 1024 * 1024, "client_max_body_size follows it"
    # The cluster's nodes all in one upstream: any node answers any URL.
    upstream = re.search(r"upstream rapido \{(.*?)\}", text, re.DOTALL)
    assert upstream and len(re.findall(r"^\s*server\s", upstream.group(1), re.M)) >= 2
    # Access logs without query strings (a browser's ws_token is in its WebSocket URL).
    formats = re.findall(r"^log_format\s+(\S+)(.*?);", text, re.MULTILINE | re.DOTALL)
    assert formats, "a log_format of its own"
    for name, fmt in formats:
        for var in ("$request ", "$request\"", "$request'", "$request_uri", "$args",
                    "$query_string", "$arg_", "$http_referer"):
            assert var not in fmt, (name, var)
    logs = re.findall(r"^\s*access_log\s+(\S+)\s+(\S+);", text, re.MULTILINE)
    assert logs and all(fmt in dict(formats) for _, fmt in logs), logs
    # Upstream connections are dropped before the node's own idle timeout would.
    m = re.search(r"keepalive_timeout (\d+)s;", upstream.group(1))
    assert m and int(m.group(1)) < Config().http_read_timeout_s
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=rapido.example.com", "-keyout", key, "-out", cert)
    conf = tmp_path / "rapido.conf"
    conf.write_text(text.replace("/etc/ssl/rapido/fullchain.pem", str(cert))
                    .replace("/etc/ssl/rapido/privkey.pem", str(key))
                    .replace("/var/log/nginx/", f"{tmp_path}/"))
    temp = tmp_path / "temp"
    temp.mkdir()
    main = tmp_path / "nginx.conf"
    main.write_text(f"""
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {conf};
}}
""")
    proc = run(nginx, "-t", "-c", main, "-p", f"{tmp_path}/", "-e", tmp_path / "error.log",
               ok=False)
    assert proc.returncode == 0, proc.stderr


# -- Grafana -----------------------------------------------------------------------------


def _exported_metrics() -> dict[str, set[str]]:
    """Every series name a node exports -> the label names it carries."""
    metrics = Metrics()
    families: dict[str, set[str]] = {}
    for holder in (metrics, metrics.batcher):
        for obj in vars(holder).values():
            name = getattr(obj, "_name", None)
            if name is None or not hasattr(obj, "_type"):
                continue
            suffixes = {"counter": ["_total"], "gauge": [""],
                        "histogram": ["_bucket", "_sum", "_count"]}[obj._type]
            for suffix in suffixes:
                families[name + suffix] = set(obj._labelnames)
    # The same names as the text a node serves.
    text = metrics.render().decode()
    for name in families:
        base = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert f"# TYPE {base}" in text, name
    return families


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    exported = _exported_metrics()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
            assert names, f"{panel['title']}: no metric in {expr}"
            missing = names - set(exported)
            assert not missing, f"{panel['title']}: {missing} is not exported"
            labels = {lab.strip() for group in re.findall(r"by \(([^)]*)\)", expr)
                      for lab in group.split(",")} - {"instance", "le"}
            have = set().union(*(exported[n] for n in names))
            assert labels <= have, f"{panel['title']}: labels {labels - have} do not exist"
            used |= names
    wanted = {"concurrent_streams_total", "speaking_streams", "audio_buffer_underruns_total",
              "frame_processing_latency_seconds_bucket", "video_quality_score",
              "gpu_utilization_percent", "gpu_memory_used_bytes", "batch_size_sum",
              "batch_size_count", "batch_queue_wait_seconds_bucket",
              "batch_deadline_misses_total", "batch_failures_total", "http_requests_total",
              "http_request_duration_seconds_bucket", "sessions_rejected_total",
              "websocket_connections", "livekit_connection_seconds_bucket"}
    assert wanted <= used, f"not on the dashboard: {wanted - used}"


# -- the GPU bench script ------------------------------------------------------------------


def _fake_gpu(tmp_path: Path, listing: str = "GPU 0: Fake H200 (UUID: GPU-0)",
              rc: int = 0) -> dict[str, str]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(parents=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{listing}'\nexit {rc}\n")
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "OUT": str(tmp_path / "out")}


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, proc
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]


def test_gpu_bench_refuses_clearly_without_a_gpu(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi") is None:  # this machine: the real refusal
        _one_line_exit_2(run("bash", GPU_BENCH, ok=False), "nvidia-smi")
    no_cuda = tmp_path / "python-no-cuda"
    no_cuda.write_text("#!/bin/sh\nexit 1\n")
    no_cuda.chmod(0o755)
    env = {**_fake_gpu(tmp_path), "PYTHON": str(no_cuda)}
    _one_line_exit_2(run("bash", GPU_BENCH, env=env, ok=False), "torch", "CUDA")
    assert not (tmp_path / "out").exists()
    broken = {**_fake_gpu(tmp_path / "b", "NVIDIA-SMI has failed", rc=9), "PYTHON": str(no_cuda)}
    _one_line_exit_2(run("bash", GPU_BENCH, env=broken, ok=False), "nvidia-smi -L")


def test_gpu_bench_runs_the_real_cli_with_torch_fp16(tmp_path: Path) -> None:
    """With a (faked) GPU the script runs `rapido bench --capacity` with flags the CLI
    has and the torch/cuda/float16 settings, which Config accepts: --max-batch 0, added
    last, makes the real CLI stop at the config check instead of benchmarking."""
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 0\n'
                  f'env | grep ^RAPIDO_ > "$OUT/env.txt"\n'
                  f'exec {sys.executable} "$@" --max-batch 0\n')
    py.chmod(0o755)
    env = {**_fake_gpu(tmp_path / "fake"), "PYTHON": str(py)}
    proc = run("bash", GPU_BENCH, env=env, ok=False)
    out = Path(env["OUT"])
    assert proc.returncode == 2, proc
    assert "rapido bench --capacity --json --model wav2lip-96" in proc.stdout
    assert "config error: max_batch" in proc.stderr, proc.stderr  # all flags parsed
    assert "unrecognized arguments" not in proc.stderr
    assert not (out / "gpu_bench.json").exists()
    got = dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines())
    assert (got["RAPIDO_BACKEND"], got["RAPIDO_DEVICE"], got["RAPIDO_DTYPE"]) == (
        "torch", "cuda", "float16")
    assert re.search(r"timeout -s INT -k \d+ \"\$limit\"", GPU_BENCH.read_text())
    assert "BENCH_TIMEOUT_S:-570" in GPU_BENCH.read_text()


# -- the scripts themselves ------------------------------------------------------------------


def test_scripts_parse_and_pass_shellcheck() -> None:
    run("sh", "-n", WRAPPER)
    run("bash", "-n", INSTALL)
    run("bash", "-n", GPU_BENCH)
    for script in (WRAPPER, INSTALL, GPU_BENCH):
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
    run(tool("shellcheck"), WRAPPER, INSTALL, GPU_BENCH, INSTALL_TEST_DEPS)


def test_test_tools_script_lists_what_the_tests_run(tmp_path: Path) -> None:
    """One list of system tools: the tests ask only for tools the install script knows,
    and its --check names every missing package."""
    tools = system_tools()
    assert {"systemd-analyze", "systemctl", "nginx", "openssl", "shellcheck",
            "chromium"} <= set(tools)
    assert tools["systemd-analyze"] == "systemd"
    empty = tmp_path / "bin"
    empty.mkdir()
    # With nothing on PATH every tool is missing (bash itself is run by path).
    proc = run(shutil.which("bash") or "/bin/bash", INSTALL_TEST_DEPS, "--check",
               env={"PATH": str(empty)}, ok=False)
    # ... except those in /usr/sbin or /sbin, which the script always looks in.
    in_sbin = {name for name in tools for d in ("/usr/sbin", "/sbin") if Path(d, name).exists()}
    assert proc.returncode == 1, proc.stderr
    for name, package in tools.items():
        if name not in in_sbin:
            assert f" {name}" in proc.stdout and package in proc.stdout, proc.stdout
    proc = run("bash", INSTALL_TEST_DEPS, "--bogus", ok=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
