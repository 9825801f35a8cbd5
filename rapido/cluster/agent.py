"""The Serf agent beside a node: started as a child process, checked until its RPC
answers, left gracefully and stopped on close.

Secrets never go on the command line (``ps`` shows it to every user): the RPC auth token
and the keyring file's path go into a generated JSON config file (mode 0600, in a
private temporary directory); the keys stay in the operator's keyring file, which Serf
also rewrites when keys are rotated through it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rapido.aio import cancel_and_wait
from rapido.cluster.serf import SerfAuthError, SerfClient, SerfError, check_tags

log = logging.getLogger(__name__)

PROFILES: Final = frozenset({"lan", "wan", "local"})
LOG_LEVELS: Final = frozenset({"trace", "debug", "info", "warn", "err"})
KEY_SIZES: Final = (16, 24, 32)
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# The agent is exec'd through this stub, run by the same interpreter with -I -S (a few
# tens of ms, once per node). It asks the kernel to SIGKILL the agent when its parent
# dies (prctl PR_SET_PDEATHSIG), so the agent cannot outlive rapido even on kill -9,
# then execs serf (the death signal survives execve). Why a stub and not preexec_fn:
# preexec_fn runs Python in the forked child of a multi-threaded process (encoder and
# model threads), which the subprocess docs warn can deadlock, and uvloop spawns through
# libuv; an exec'd stub is a fresh single-threaded process under any loop. It also
# closes the race of a parent that dies between fork and prctl: it checks getppid()
# against the pid it was given after the prctl. Caveat of PR_SET_PDEATHSIG: "parent" is
# the *thread* that forked, so the agent must be started from the event loop's thread,
# which lives as long as the node. Elsewhere than Linux there is no death signal.
#
# Priority: a starved agent misses its probes and the cluster sees it flap, so the stub
# raises the agent's priority by ``priority_boost`` nice levels when the process may
# (CAP_SYS_NICE or an RLIMIT_NICE allowance); otherwise it keeps the node's own level,
# which is already above the encoder threads (niced below the loop). It never nices the
# agent down.
_STUB: Final = r"""
import os, sys
parent, boost = int(sys.argv[1]), int(sys.argv[2])
if sys.platform.startswith("linux"):
    import ctypes, signal
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        sys.stderr.write("serf stub: prctl(PR_SET_PDEATHSIG) failed\n")
        os._exit(70)
if os.getppid() != parent:
    os._exit(71)  # the parent died before the death signal was armed
if boost > 0:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) - boost)
    except OSError:
        pass  # not permitted: the agent keeps the node's priority
os.execv(sys.argv[3], sys.argv[3:])
"""


class SerfAgentError(SerfError):
    """The agent could not be started, or it stopped."""


class SerfAgentConfigError(ValueError):
    """A setting of the agent is wrong (address, node name, keyring file, tags)."""


@dataclass(frozen=True)
class SerfAgentSettings:
    node: str
    #: host:port of the gossip (TCP and UDP); an IP literal, IPv6 in brackets.
    bind: str
    #: The RPC listens on 127.0.0.1 at this port.
    rpc_port: int
    #: A JSON list of base64 keys (16, 24 or 32 bytes); the first one encrypts.
    #: None: gossip is not encrypted.
    keyring_file: Path | None = None
    #: The RPC token; None: a random one per start (the agent's own client gets it).
    rpc_auth: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    snapshot: Path | None = None
    advertise: str | None = None
    profile: str = "lan"  # "local" misses tag updates even on loopback
    log_level: str = "warn"
    binary: str = "serf"
    priority_boost: int = 5
    #: How often Serf tries to reach a failed member again (it picks one at random,
    #: more often the more members failed); None: Serf's 30 s. A partition heals only
    #: through this (memberlist probes and pushes/pulls with live members only).
    reconnect_interval_s: float | None = None
    start_timeout_s: float = 10.0
    stop_timeout_s: float = 10.0


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``1.2.3.4:7946`` or ``[::1]:7946`` -> (host, port); SerfAgentConfigError else."""
    if not isinstance(text, str):
        raise SerfAgentConfigError(f"{what} must be host:port, got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise SerfAgentConfigError(f"{what} must be host:port, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host or ":" not in host:
            raise SerfAgentConfigError(f"{what}: brackets are for IPv6 only, got {text!r}")
    elif ":" in host:
        raise SerfAgentConfigError(f"{what}: an IPv6 address goes in brackets, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SerfAgentConfigError(f"{what}: {host!r} is not an IP address") from None
    port = int(port_text)
    if not 0 < port < 65536:
        raise SerfAgentConfigError(f"{what}: port {port} is not in 1..65535")
    return host, port


def read_keyring(path: Path) -> list[bytes]:
    """The keys of a Serf keyring file; SerfAgentConfigError naming what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SerfAgentConfigError(f"keyring file {path}: cannot read it: {e}") from None
    try:
        keys = json.loads(text)
    except ValueError as e:
        raise SerfAgentConfigError(f"keyring file {path}: not JSON: {e}") from None
    if not isinstance(keys, list) or not keys:
        raise SerfAgentConfigError(
            f"keyring file {path}: must be a non-empty JSON list of base64 keys")
    decoded = []
    for i, key in enumerate(keys):
        if not isinstance(key, str):
            raise SerfAgentConfigError(f"keyring file {path}: key {i} is not a string")
        try:
            raw = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise SerfAgentConfigError(f"keyring file {path}: key {i} is not base64") from None
        if len(raw) not in KEY_SIZES:
            raise SerfAgentConfigError(f"keyring file {path}: key {i} has {len(raw)} bytes, "
                                       f"not 16, 24 or 32")
        decoded.append(raw)
    return decoded


def check_settings(s: SerfAgentSettings) -> None:
    if not isinstance(s.node, str) or not _NODE_NAME.fullmatch(s.node):
        raise SerfAgentConfigError(
            f"node name {s.node!r}: 1-128 of A-Z a-z 0-9 _ . -, starting alphanumeric")
    parse_host_port(s.bind, "bind address")
    if s.advertise is not None:
        parse_host_port(s.advertise, "advertise address")
    if not isinstance(s.rpc_port, int) or not 0 < s.rpc_port < 65536:
        raise SerfAgentConfigError(f"rpc port {s.rpc_port!r} is not in 1..65535")
    if s.keyring_file is not None:
        read_keyring(s.keyring_file)
    if s.rpc_auth is not None and (not s.rpc_auth or not s.rpc_auth.isprintable()):
        raise SerfAgentConfigError("rpc_auth must be a non-empty printable string")
    try:
        check_tags(s.tags)
    except ValueError as e:
        raise SerfAgentConfigError(str(e)) from None
    if s.snapshot is not None and not Path(s.snapshot).parent.is_dir():
        raise SerfAgentConfigError(f"snapshot {s.snapshot}: its directory does not exist")
    if s.profile not in PROFILES:
        raise SerfAgentConfigError(f"profile {s.profile!r} is not one of {sorted(PROFILES)}")
    if s.log_level not in LOG_LEVELS:
        raise SerfAgentConfigError(f"log level {s.log_level!r} not in {sorted(LOG_LEVELS)}")
    if not 0 <= s.priority_boost <= 20:
        raise SerfAgentConfigError(f"priority_boost {s.priority_boost} is not in 0..20")
    r = s.reconnect_interval_s
    if r is not None and (isinstance(r, bool) or not isinstance(r, int | float)
                          or not 0.1 <= r <= 3600):
        raise SerfAgentConfigError(f"reconnect_interval_s {r!r} is not in 0.1..3600")


class SerfAgent:
    """``serf agent`` as a child process. ``await start()``, then ``client`` is a
    connected SerfClient (``connect()`` opens more); ``aclose()`` leaves the cluster
    gracefully and stops the process."""

    def __init__(self, settings: SerfAgentSettings) -> None:
        check_settings(settings)
        self.settings = settings
        self.rpc_addr = f"127.0.0.1:{settings.rpc_port}"
        self.rpc_auth = settings.rpc_auth or secrets.token_urlsafe(24)
        self.client: SerfClient | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._output: deque[str] = deque(maxlen=30)
        self._dir: Path | None = None
        self._closing = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    async def wait(self) -> int:
        """Until the agent's process has exited (however): its return code."""
        if self._proc is None:
            raise RuntimeError("SerfAgent.wait() before start()")
        return await self._proc.wait()

    def command(self, config_file: Path) -> list[str]:
        s = self.settings
        binary = shutil.which(s.binary)
        if binary is None:
            raise SerfAgentError(f"serf binary {s.binary!r} not found "
                                 f"(the Debian package serf installs /usr/bin/serf)")
        args = [binary, "agent", f"-node={s.node}", f"-bind={s.bind}",
                f"-rpc-addr={self.rpc_addr}", f"-profile={s.profile}",
                f"-log-level={s.log_level}", f"-config-file={config_file}"]
        if s.advertise is not None:
            args.append(f"-advertise={s.advertise}")
        if s.snapshot is not None:
            args.append(f"-snapshot={Path(s.snapshot).resolve()}")
        return args

    def _write_config(self) -> Path:
        s = self.settings
        self._dir = Path(tempfile.mkdtemp(prefix=f"rapido-serf-{s.node}-"))  # mode 0700
        config: dict[str, Any] = {"rpc_auth": self.rpc_auth, "tags": dict(s.tags)}
        if s.keyring_file is not None:
            config["keyring_file"] = str(Path(s.keyring_file).resolve())
        if s.reconnect_interval_s is not None:
            config["reconnect_interval"] = f"{round(s.reconnect_interval_s * 1000)}ms"
        path = self._dir / "agent.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        return path

    async def start(self) -> None:
        """Start the agent and wait until its RPC answers (as this node, with our
        token); SerfAgentError with the agent's last output when it does not."""
        if self._proc is not None:
            raise RuntimeError("SerfAgent.start() called twice")
        s = self.settings
        config_file = self._write_config()
        args = self.command(config_file)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", _STUB, str(os.getpid()),
            str(s.priority_boost), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self._log_task = asyncio.create_task(self._read_output(),
                                             name=f"serf-agent-output {s.node}")
        try:
            self.client = await self._wait_ready()
        except BaseException:
            await self._stop_process()
            raise
        finally:
            # The agent has read its config: the token leaves the disk now, so not even
            # a kill -9 of the node leaves it behind. (Serf re-reads its config files on
            # SIGHUP, which nothing here sends.)
            self._remove_dir()
        log.info("serf agent %s: pid %d, gossip %s, rpc %s", s.node, self._proc.pid,
                 s.bind, self.rpc_addr)

    async def connect(self) -> SerfClient:
        """Another RPC connection to this agent (e.g. one that streams)."""
        return await SerfClient.connect(self.rpc_addr, self.rpc_auth)

    async def _wait_ready(self) -> SerfClient:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout_s
        last: Exception | None = None
        while loop.time() < deadline:
            if self._proc.returncode is not None:
                break
            try:
                client = await SerfClient.connect(self.rpc_addr, self.rpc_auth, timeout_s=2)
            except SerfAuthError as e:
                raise SerfAgentError(
                    f"serf agent {self.settings.node}: {self.rpc_addr} refused our RPC "
                    f"token: another agent holds that port? ({e})") from None
            except SerfError as e:
                last = e
                await asyncio.sleep(0.05)
                continue
            try:
                name = (await client.stats()).get("agent", {}).get("name")
            except SerfError as e:
                await client.aclose()
                last = e
                continue
            if name != self.settings.node or self._proc.returncode is not None:
                await client.aclose()
                raise SerfAgentError(
                    f"serf agent {self.settings.node}: {self.rpc_addr} answers as "
                    f"{name!r}: another agent holds that port")
            return client
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await self._proc.wait()  # its last words, when it is exiting
        output = "\n".join(self._output) or "(no output)"
        if self._proc.returncode is not None:
            raise SerfAgentError(f"serf agent {self.settings.node} exited with "
                                 f"{self._proc.returncode}:\n{output}")
        raise SerfAgentError(f"serf agent {self.settings.node}: RPC {self.rpc_addr} not "
                             f"ready in {self.settings.start_timeout_s}s ({last}):\n{output}")

    async def _read_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        node = self.settings.node
        while line_bytes := await self._proc.stdout.readline():
            line = line_bytes.decode(errors="replace").rstrip()
            if not line.strip():
                continue
            self._output.append(line)
            if "[ERR]" in line or "Error" in line:
                log.error("serf %s: %s", node, line.strip())
            elif "[WARN]" in line:
                log.warning("serf %s: %s", node, line.strip())
            else:
                log.debug("serf %s: %s", node, line.strip())
        rc = await self._proc.wait()
        if not self._closing:
            log.error("serf agent %s exited unexpectedly with %s", node, rc)

    async def aclose(self, leave: bool = True) -> None:
        """Leave the cluster (so the others see 'left', not 'failed'), then stop;
        ``leave=False``: stop at once (SIGTERM: the others will see it fail)."""
        self._closing = True
        left = False
        if leave and self.client is not None and self._proc is not None and \
                self._proc.returncode is None:
            try:
                await self.client.leave()  # the agent exits by itself after a leave
                left = True
            except SerfError as e:
                log.warning("serf agent %s: graceful leave failed: %s",
                            self.settings.node, e)
        await self._stop_process(wait_first=left)

    async def _stop_process(self, wait_first: bool = False) -> None:
        """Wait for the agent to exit (after a leave), else SIGTERM, then SIGKILL."""
        self._closing = True
        if self.client is not None:
            await self.client.aclose()
        proc = self._proc
        half = self.settings.stop_timeout_s / 2
        steps: list[tuple[signal.Signals | None, float | None]] = []
        if wait_first:
            steps.append((None, half))
        steps += [(signal.SIGTERM, half), (signal.SIGKILL, None)]
        for sig, wait in steps:
            if proc is None or proc.returncode is not None:
                break
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await proc.wait()
        await cancel_and_wait([self._log_task])
        self._remove_dir()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
