"""Fault injection for cluster benchmarks and tests: a fresh network namespace, and
nftables rules inside it (random loss, partitions, byte counters per port).

How it is used: a driver (the ``bench cluster`` command, a pytest test) calls
:func:`run_in_netns` with a target ``"module:function"`` and JSON parameters. This
starts ``unshare --net -- python -m rapido.bench.netns ...``: a child process in a new,
empty network namespace (only ``lo``, brought up here), which imports the target, calls
``await function(firewall, params)`` and hands its JSON-able return value back through a
file. Everything the scenario starts (Serf agents, rapido nodes, ``nft``) runs inside,
on 127.0.0.1, and the namespace vanishes with the child, rules and all; nothing touches
the machine's own network. The child's stderr is the caller's (progress lines, logs).

Inside, :class:`Firewall` owns one nftables table, ``inet rapido_faults``:

* ``count`` (hook output): counts every packet by source port (set ``tx``) and by
  destination port (set ``rx``) for the ports registered with :meth:`Firewall.watch`,
  each packet once more in the counter ``total``; and marks each packet with its
  sender's group (below).
* ``faults`` (hook input): the fault rules. Dropping on input loses the packet silently,
  as a network would; dropping on output would fail the sender's ``sendto`` with EPERM.

Partitions need to know who *sends* a packet, and ports cannot say: every process binds
127.0.0.1, and a TCP connection (memberlist's push/pull, its TCP fallback probe, a
node's HTTP request to another node) leaves from an ephemeral port. A partition that
drops only the UDP between the two sides' ports is not one: memberlist's TCP fallback
probe still reaches the other side and keeps it alive. So every process of a partition
side runs under a group id of its own (:func:`group_argv`, :func:`grouped_binary`: a
``setpriv --regid`` prefix; the process stays root otherwise), the ``count`` chain copies
the sending socket's group into the packet mark (``meta skgid``, known on output only;
the mark survives the trip through ``lo``), and a partition drops, on input, packets
marked with one side's groups and sent to the other side's ports (TCP and UDP), both
ways. A process started without a group is never partitioned (the driver's own RPC to
the agents, for example).

Pure parts (rule text, parsing ``nft`` output) are functions, tested with inputs.

Why one module over 500 lines: the namespace runner, the firewall's rules and the parsing
of nft's output are one tool whose parts only make sense together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

TABLE: Final = "rapido_faults"
FAMILY: Final = "inet"
#: Set by run_in_netns in the child: the inode of the parent's network namespace. The
#: Firewall refuses to touch nftables unless it runs in another one (never the host's).
PARENT_NETNS_ENV: Final = "RAPIDO_NETNS_PARENT"
#: Lowest group id handed to partitioned processes (well above distribution groups).
GID_BASE: Final = 41000
_HANDLE = re.compile(r"#\s*handle\s+(\d+)\s*$", re.MULTILINE)


class NetnsError(RuntimeError):
    """The namespace could not be made, the scenario failed, or nft refused a rule."""


# ------------------------------------------------------------------------------ values


@dataclass(frozen=True, order=True)
class Counter:
    packets: int = 0
    bytes: int = 0

    def __add__(self, other: Counter) -> Counter:
        return Counter(self.packets + other.packets, self.bytes + other.bytes)

    def __sub__(self, other: Counter) -> Counter:
        return Counter(self.packets - other.packets, self.bytes - other.bytes)


@dataclass(frozen=True)
class Endpoint:
    """A process (tree) seen by a partition: the group id it sends with, the ports it
    receives on (a Serf agent: its gossip port; a rapido node: HTTP and gossip)."""

    gid: int
    ports: tuple[int, ...]


@dataclass(frozen=True)
class Fault:
    """Rules added together (one loss, one partition); :meth:`Firewall.heal` removes
    them."""

    name: str
    handles: tuple[int, ...]


@dataclass(frozen=True)
class Snapshot:
    """The table's counters at one moment (monotonic ``at``)."""

    at: float
    tx: dict[int, Counter]  # packets sent from a watched port
    rx: dict[int, Counter]  # packets sent to a watched port
    total: Counter  # packets from or to any watched port, each once
    rules: dict[int, Counter]  # fault rules' own counters, by handle

    def since(self, before: Snapshot) -> Snapshot:
        def diff(now: dict[int, Counter], then: dict[int, Counter]) -> dict[int, Counter]:
            return {k: v - then.get(k, Counter()) for k, v in now.items()}
        return Snapshot(at=self.at - before.at, tx=diff(self.tx, before.tx),
                        rx=diff(self.rx, before.rx), total=self.total - before.total,
                        rules=diff(self.rules, before.rules))

    def port_bytes(self, port: int) -> int:
        """Bytes sent from + sent to ``port`` (TCP: only the side that was connected
        to sees its traffic counted; the connecting side uses an ephemeral port)."""
        return self.tx.get(port, Counter()).bytes + self.rx.get(port, Counter()).bytes

    def dropped(self, fault: Fault) -> Counter:
        out = Counter()
        for handle in fault.handles:
            out += self.rules.get(handle, Counter())
        return out


# ---------------------------------------------------------------------- rule text (pure)


def _ports(ports: Iterable[int]) -> str:
    values = sorted(set(ports))
    if not values:
        raise ValueError("no ports given")
    for p in values:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
            raise ValueError(f"port {p!r} is not in 1..65535")
    return "{ " + ", ".join(map(str, values)) + " }"


def _gids(gids: Iterable[int]) -> str:
    values = sorted(set(gids))
    if not values:
        raise ValueError("no group ids given")
    for g in values:
        if not isinstance(g, int) or isinstance(g, bool) or not 0 < g < 2**31:
            raise ValueError(f"group id {g!r} is not in 1..2^31-1")
    return "{ " + ", ".join(map(str, values)) + " }"


def _comment(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9 _.:,|%-]{1,100}", text):
        raise ValueError(f"comment {text!r}: 1-100 of A-Z a-z 0-9 space _ . : , | % -")
    return f'comment "{text}"'


def table_script() -> str:
    """The table, from nothing (``nft -f -``): counting sets, the group map, chains."""
    t = f"{FAMILY} {TABLE}"
    return "\n".join([
        f"add table {t}",
        f"add set {t} tx {{ type inet_service; counter; }}",
        f"add set {t} rx {{ type inet_service; counter; }}",
        f"add set {t} watched {{ type inet_service; }}",
        f"add map {t} groups {{ type gid : mark; }}",
        f"add counter {t} total",
        f"add chain {t} count {{ type filter hook output priority -10; policy accept; }}",
        f"add rule {t} count meta l4proto {{ tcp, udp }} th sport @tx",
        f"add rule {t} count meta l4proto {{ tcp, udp }} th dport @rx",
        f"add rule {t} count meta l4proto {{ tcp, udp }} th dport @watched counter name total",
        f"add rule {t} count meta l4proto {{ tcp, udp }} th dport != @watched "
        f"th sport @watched counter name total",
        f"add rule {t} count meta mark set meta skgid map @groups",
        f"add chain {t} faults {{ type filter hook input priority 0; policy accept; }}",
        "",
    ])


def watch_script(ports: Iterable[int] = (), gids: Iterable[int] = ()) -> str:
    """Count these ports; mark packets sent by these groups."""
    t = f"{FAMILY} {TABLE}"
    lines = []
    ports = list(ports)
    if ports:
        for name in ("tx", "rx", "watched"):
            lines.append(f"add element {t} {name} {_ports(ports)}")
    gids = sorted(set(gids))
    if gids:
        _gids(gids)
        pairs = ", ".join(f"{g} : {g}" for g in gids)
        lines.append(f"add element {t} groups {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def loss_rule(ports: Iterable[int], percent: float, proto: str = "udp",
              comment: str = "loss") -> str:
    """A rule (for the ``faults`` chain) dropping ``percent`` % of the ``proto`` packets
    sent to ``ports``, at random (in steps of 0.01 %)."""
    if proto not in ("udp", "tcp"):
        raise ValueError(f"proto must be udp or tcp, got {proto!r}")
    if not 0 < percent <= 100:
        raise ValueError(f"loss must be in (0, 100] %, got {percent!r}")
    per_10k = round(percent * 100)
    return (f"{proto} dport {_ports(ports)} numgen random mod 10000 < {per_10k} "
            f"counter drop {_comment(comment)}")


def partition_rules(sides: Sequence[Sequence[Endpoint]], comment: str = "partition"
                    ) -> list[str]:
    """Rules cutting every side off from every other, both ways: packets sent by one
    side's groups to another side's ports are dropped, TCP and UDP."""
    if len(sides) < 2 or any(not side for side in sides):
        raise ValueError("a partition needs at least two non-empty sides")
    seen: set[int] = set()
    for side in sides:
        for ep in side:
            if ep.gid in seen:
                raise ValueError(f"group {ep.gid} is on two sides")
            seen.add(ep.gid)
    rules = []
    for i, senders in enumerate(sides):
        gids = _gids(ep.gid for ep in senders)
        for j, receivers in enumerate(sides):
            if i == j:
                continue
            ports = _ports(p for ep in receivers for p in ep.ports)
            rules.append(f"meta mark {gids} meta l4proto {{ tcp, udp }} th dport {ports} "
                         f"counter drop {_comment(f'{comment} {i} to {j}')}")
    return rules


def parse_handle(echo: str) -> int:
    """The handle of the rule ``nft --echo --handle add rule ...`` printed."""
    found = _HANDLE.findall(echo)
    if len(found) != 1:
        raise NetnsError(f"nft did not echo one rule handle: {echo.strip()!r}")
    return int(found[0])


def parse_snapshot(text: str, at: float = 0.0) -> Snapshot:
    """Counters from ``nft --json list table inet rapido_faults``."""
    try:
        doc = json.loads(text)
        items = doc["nftables"]
    except (ValueError, KeyError, TypeError) as e:
        raise NetnsError(f"nft --json: not the expected document: {e}") from None
    sets: dict[str, dict[int, Counter]] = {"tx": {}, "rx": {}}
    total = Counter()
    rules: dict[int, Counter] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        if "set" in item and item["set"].get("name") in sets:
            target = sets[item["set"]["name"]]
            for elem in item["set"].get("elem", []):
                inner = elem.get("elem", elem) if isinstance(elem, dict) else None
                if not isinstance(inner, dict) or not isinstance(inner.get("val"), int):
                    continue  # a set without the counter flag lists bare values
                c = inner.get("counter") or {}
                target[inner["val"]] = Counter(int(c.get("packets", 0)),
                                               int(c.get("bytes", 0)))
        elif "counter" in item and item["counter"].get("name") == "total":
            c = item["counter"]
            total = Counter(int(c.get("packets", 0)), int(c.get("bytes", 0)))
        elif "rule" in item and item["rule"].get("chain") == "faults":
            rule = item["rule"]
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                    c = expr["counter"]
                    rules[int(rule["handle"])] = Counter(int(c.get("packets", 0)),
                                                         int(c.get("bytes", 0)))
    return Snapshot(at=at, tx=sets["tx"], rx=sets["rx"], total=total, rules=rules)


# ----------------------------------------------------------------------- the firewall


def netns_inode(pid: str = "self") -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def in_private_netns() -> bool:
    """True in a namespace run_in_netns made (not the one it was started from)."""
    parent = os.environ.get(PARENT_NETNS_ENV)
    return parent is not None and parent.isdigit() and int(parent) != netns_inode()


class Firewall:
    """The ``inet rapido_faults`` table of this (private) namespace, driven through
    ``nft``. ``await setup()`` first (run_in_netns does), then ``watch`` ports and
    groups, add faults, read counters."""

    def __init__(self, nft: str | None = None) -> None:
        self.nft = nft or _which("nft") or "nft"
        self._seq = 0

    async def _run(self, *args: str, script: str | None = None) -> str:
        if not in_private_netns():
            raise NetnsError("refusing to change nftables outside a namespace made by "
                             "rapido.bench.netns.run_in_netns")
        argv = [self.nft, *args] + (["-f", "-"] if script is not None else [])
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE if script is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate(script.encode() if script is not None else None)
        if proc.returncode != 0:
            raise NetnsError(f"{shlex.join(argv)} failed ({proc.returncode}): "
                             f"{err.decode(errors='replace').strip()}"
                             + (f"\nscript:\n{script}" if script else ""))
        return out.decode(errors="replace")

    async def setup(self) -> None:
        await self._run(script=table_script())

    async def watch(self, ports: Iterable[int] = (), gids: Iterable[int] = ()) -> None:
        """Count packets from/to ``ports``; mark packets sent by ``gids`` (needed
        before a partition can cut them)."""
        script = watch_script(ports, gids)
        if script.strip():
            await self._run(script=script)

    async def add_rules(self, name: str, rules: Sequence[str]) -> Fault:
        handles = []
        try:
            for rule in rules:
                echo = await self._run("--echo", "--handle", "add", "rule", FAMILY, TABLE,
                                       "faults", rule)
                handles.append(parse_handle(echo))
        except BaseException:
            await self.heal(Fault(name, tuple(handles)))
            raise
        return Fault(name, tuple(handles))

    async def loss(self, ports: Iterable[int], percent: float, proto: str = "udp") -> Fault:
        """Drop ``percent`` % of the packets sent to ``ports`` at random."""
        self._seq += 1
        name = f"loss{self._seq}"
        return await self.add_rules(name, [loss_rule(ports, percent, proto, comment=name)])

    async def partition(self, *sides: Sequence[Endpoint]) -> Fault:
        """Cut the sides off from each other, both ways, TCP and UDP."""
        await self.watch(gids=[ep.gid for side in sides for ep in side])
        self._seq += 1
        name = f"partition{self._seq}"
        return await self.add_rules(name, partition_rules(sides, comment=name))

    async def heal(self, fault: Fault | None = None) -> None:
        """Remove one fault's rules, or every fault rule (None)."""
        if fault is None:
            await self._run("flush", "chain", FAMILY, TABLE, "faults")
            return
        for handle in fault.handles:
            await self._run("delete", "rule", FAMILY, TABLE, "faults", "handle", str(handle))

    async def snapshot(self) -> Snapshot:
        text = await self._run("--json", "list", "table", FAMILY, TABLE)
        return parse_snapshot(text, at=time.monotonic())

    async def ruleset(self) -> str:
        """The table as text (for a failure message)."""
        return await self._run("list", "table", FAMILY, TABLE)


# ---------------------------------------------------------------- processes in a group


def group_argv(gid: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run with group id ``gid`` (still root otherwise), so a partition can
    tell its packets apart; killed when its parent dies (setpriv's --regid clears the
    death signal an earlier stub set, so it is set again)."""
    _gids([gid])
    setpriv = _which("setpriv") or "setpriv"
    return [setpriv, f"--regid={gid}", "--keep-groups", "--pdeathsig=KILL", "--", *argv]


def grouped_binary(gid: int, binary: str, directory: Path) -> Path:
    """An executable that runs ``binary`` under group ``gid`` with its arguments: for
    settings that take one binary path (``SerfAgentSettings.binary``)."""
    real = shutil.which(binary)
    if real is None:
        raise NetnsError(f"{binary} not found")
    path = Path(directory) / f"{Path(binary).name}-gid{gid}"
    path.write_text("#!/bin/sh\nexec " + shlex.join(group_argv(gid, [real])) + ' "$@"\n')
    path.chmod(0o755)
    return path


# ------------------------------------------------------------------- the namespace


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def netns_problem() -> str | None:
    """Why a scenario cannot run in a namespace here (a tool missing, not permitted),
    as one line; None when it can."""
    for tool in ("unshare", "nft", "setpriv"):
        if _which(tool) is None:
            return f"{tool} not found"
    try:
        probe = subprocess.run([_which("unshare") or "unshare", "--net", "--", "true"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare --net failed: {e}"
    if probe.returncode != 0:
        return (f"unshare --net failed (needs root or CAP_SYS_ADMIN): "
                f"{probe.stderr.strip() or probe.returncode}")
    return None


def netns_command(target: str, params_file: Path, result_file: Path) -> list[str]:
    """The command that runs ``target`` in a fresh namespace (for run_in_netns)."""
    if not re.fullmatch(r"[\w.]+:\w+", target):
        raise ValueError(f"target must be module:function, got {target!r}")
    return [_which("unshare") or "unshare", "--net", "--", sys.executable,
            "-m", "rapido.bench.netns", target, str(params_file), str(result_file)]


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(os.environ if env is None else env)
    # The child imports the same rapido as this process, whatever is installed.
    root = str(Path(__file__).resolve().parents[2])
    path = out.get("PYTHONPATH", "")
    out["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    out[PARENT_NETNS_ENV] = str(netns_inode())
    return out


def run_in_netns(target: str, params: Mapping[str, Any] | None = None, *,
                 timeout_s: float, cwd: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None) -> Any:
    """Run ``await module.function(firewall, params)`` in a fresh network namespace
    and return what it returned (JSON round-tripped). NetnsError when the child fails
    or outlives ``timeout_s`` (then its whole process group is killed). ``cwd``
    (default: the repository root) is on the child's import path: ``tests.x:f`` works."""
    with tempfile.TemporaryDirectory(prefix="rapido-netns-") as tmp:
        params_file, result_file = Path(tmp) / "params.json", Path(tmp) / "result.json"
        params_file.write_text(json.dumps(dict(params or {})))
        argv = netns_command(target, params_file, result_file)
        proc = subprocess.Popen(argv, cwd=cwd or Path(__file__).resolve().parents[2],
                                env=_child_env(env), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            raise NetnsError(f"{target} in a network namespace: still running after "
                             f"{timeout_s} s; killed") from None
        except BaseException:  # KeyboardInterrupt: nothing of it stays behind
            _kill_group(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            _kill_group(proc.pid)
            raise
        if rc != 0 or not result_file.exists():
            raise NetnsError(f"{target} in a network namespace exited with {rc} "
                             f"(its output is above)")
        return json.loads(result_file.read_text())


async def run_in_netns_async(target: str, params: Mapping[str, Any] | None = None, *,
                             timeout_s: float, cwd: str | os.PathLike[str] | None = None,
                             env: Mapping[str, str] | None = None) -> Any:
    """run_in_netns from a coroutine (in a thread: the loop keeps running)."""
    return await asyncio.to_thread(run_in_netns, target, params, timeout_s=timeout_s,
                                   cwd=cwd, env=env)


def _kill_group(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# ----------------------------------------------------------------------- the child side


def lo_up() -> None:
    """``ip link set lo up`` without iproute2 (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


async def _call(target: str, params: dict[str, Any]) -> Any:
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    firewall = Firewall()
    await firewall.setup()
    result = func(firewall, params)
    if inspect.isawaitable(result):
        result = await result
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m rapido.bench.netns MODULE:FUNCTION PARAMS.json RESULT.json "
              "(started by run_in_netns, inside unshare --net)", file=sys.stderr)
        return 2
    if not in_private_netns():
        print("rapido.bench.netns: not in a namespace run_in_netns made; refusing",
              file=sys.stderr)
        return 2
    target, params_file, result_file = args
    lo_up()
    params = json.loads(Path(params_file).read_text())
    result = asyncio.run(_call(target, params))
    text = json.dumps(result, default=_json_default)
    Path(result_file).write_text(text)
    return 0


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON-able: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
