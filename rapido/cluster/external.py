"""A Serf agent the operator runs (``serf_rpc``): the node connects to its RPC instead of
starting one as its child.

Why run it apart: an agent in its own systemd unit (``systemd/rapido-serf@.service``) can
be given a higher CPU priority than the media work (``Nice=``, ``CPUWeight=``), which the
node's hardened unit cannot give its own child (no ``CAP_SYS_NICE``); a starved agent
misses its probes and the cluster sees the node flap.

The node never starts, restarts or kills such an agent. It connects (retrying for a while:
a unit starting beside the node may not listen yet), checks that the agent is named after
the node, writes the node's tags, and, on a graceful stop, asks it to ``leave``: the
others see the node ``left``, and the agent then exits by itself, as an agent bound to the
node's unit should. If its RPC connection breaks, the cluster service shows ``degraded``
and reconnects with backoff (``service.py``); it never spawns an agent of its own.

The RPC is unencrypted, so the address must be a loopback one; its auth token comes from a
file (``serf_rpc_auth_file``), never from the command line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rapido.cluster.agent import SerfAgentConfigError, SerfAgentError, parse_host_port
from rapido.cluster.serf import SerfAuthError, SerfClient, SerfError, check_tags

log = logging.getLogger(__name__)

#: The longest RPC auth token a file may hold (Serf has no limit; this is a sanity bound).
MAX_AUTH_LEN = 1024


def check_rpc_addr(text: str, what: str = "serf_rpc") -> tuple[str, int]:
    """``127.0.0.1:7373`` or ``[::1]:7373``: a loopback host:port (the RPC is not
    encrypted); SerfAgentConfigError naming ``what`` otherwise."""
    host, port = parse_host_port(text, what)
    if not ipaddress.ip_address(host).is_loopback:
        raise SerfAgentConfigError(
            f"{what}: {host} is not a loopback address; Serf's RPC is unencrypted, so "
            "rapido talks to an agent on its own machine only (127.0.0.1 or [::1])")
    return host, port


def read_rpc_auth(path: Path) -> str:
    """The RPC auth token in ``path``: the file's text (one line), or the ``rpc_auth`` of
    a Serf JSON config file (the agent's own, so the token is written once)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SerfAgentConfigError(f"cannot read {path}: {e}") from None
    token: object = text.strip()
    if text.lstrip().startswith("{"):
        try:
            config = json.loads(text)
        except ValueError as e:
            raise SerfAgentConfigError(f"{path}: not a JSON object: {e}") from None
        token = config.get("rpc_auth") if isinstance(config, dict) else None
        if token is None:
            raise SerfAgentConfigError(f"{path}: a Serf config file without rpc_auth")
    if not isinstance(token, str) or not token or len(token) > MAX_AUTH_LEN \
            or not token.isprintable() or "\n" in token:
        raise SerfAgentConfigError(f"{path}: the token must be one line of 1-{MAX_AUTH_LEN} "
                                   "printable characters")
    return token


@dataclass(frozen=True)
class ExternalAgentSettings:
    node: str  # the name the agent must have: the node's id
    rpc_addr: str  # a loopback host:port
    rpc_auth: str | None = field(default=None, repr=False)
    tags: Mapping[str, str] = field(default_factory=dict)
    #: Tags of ours that are deleted when ``tags`` has none (an agent that outlived a
    #: node which crashed may still carry its last ones); others' tags are left alone.
    owned_tags: tuple[str, ...] = ()
    start_timeout_s: float = 10.0


class ExternalSerfAgent:
    """The same face as :class:`~rapido.cluster.agent.SerfAgent` towards the cluster
    service (``start``, ``client``, ``connect``, ``wait``, ``aclose``), over an agent
    someone else runs: ``pid`` and ``returncode`` are always None."""

    pid: int | None = None
    returncode: int | None = None

    def __init__(self, settings: ExternalAgentSettings) -> None:
        check_rpc_addr(settings.rpc_addr)
        try:
            check_tags(settings.tags)
        except ValueError as e:
            raise SerfAgentConfigError(str(e)) from None
        self.settings = settings
        self.rpc_addr = settings.rpc_addr
        self.client: SerfClient | None = None
        #: The agent's gossip address (host:port), as it lists itself; known after start.
        self.bind = ""

    async def start(self) -> None:
        """Connect (retrying until ``start_timeout_s``), check the agent's name, write
        the tags. SerfAgentConfigError: a wrong token or name (no retry fixes those);
        SerfAgentError: nothing answered in time."""
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.start_timeout_s
        delay = 0.1
        while True:
            try:
                client = await SerfClient.connect(self.rpc_addr, s.rpc_auth, timeout_s=2)
                break
            except SerfAuthError as e:
                raise SerfAgentConfigError(
                    f"serf_rpc: the agent at {self.rpc_addr} refused our RPC token "
                    f"(serf_rpc_auth_file must hold its rpc_auth): {e}") from None
            except SerfError as e:
                if loop.time() + delay > deadline:
                    raise SerfAgentError(
                        f"no serf agent answers at {self.rpc_addr} (serf_rpc) after "
                        f"{s.start_timeout_s:g} s: {e}") from None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        try:
            await self._check(client)
        except BaseException:
            await client.aclose()
            raise
        self.client = client
        log.info("serf agent %s at %s (run by the operator), gossip %s", s.node,
                 self.rpc_addr, self.bind)

    async def _check(self, client: SerfClient) -> None:
        s = self.settings
        name = (await client.stats()).get("agent", {}).get("name")
        if name != s.node:
            raise SerfAgentConfigError(
                f"serf_rpc: the agent at {self.rpc_addr} is named {name!r}, not "
                f"{s.node!r}: the agent's node name must be the node's id (set node_id to "
                f"{name!r}, or start the agent with -node={s.node})")
        me = [m for m in await client.members() if m.name == s.node]
        if me:
            host = me[0].addr
            self.bind = f"[{host}]:{me[0].port}" if ":" in host else f"{host}:{me[0].port}"
        await client.tags(set=dict(s.tags),
                          delete=[k for k in s.owned_tags if k not in s.tags])

    async def connect(self) -> SerfClient:
        """Another RPC connection to this agent (e.g. one that streams)."""
        return await SerfClient.connect(self.rpc_addr, self.settings.rpc_auth)

    async def wait(self) -> None:
        """Until the RPC connection is gone (the agent exited, or the connection broke)."""
        if self.client is None:
            raise RuntimeError("ExternalSerfAgent.wait() before start()")
        await self.client.wait_closed()

    async def aclose(self, leave: bool = True) -> None:
        """``leave``: leave the cluster gracefully (the others see ``left``; the agent then
        shuts down by itself). Either way the connection closes; the agent is never
        signalled."""
        client, self.client = self.client, None
        if client is None:
            return
        if leave and not client.closed:
            try:
                await client.leave()
            except SerfError as e:
                log.warning("serf agent %s at %s: graceful leave failed: %s",
                            self.settings.node, self.rpc_addr, e)
        await client.aclose()


__all__ = ["ExternalAgentSettings", "ExternalSerfAgent", "SerfAgentError", "check_rpc_addr",
           "read_rpc_auth"]
