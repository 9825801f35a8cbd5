"""Checks of ``rapido bench`` arguments that need nothing heavy imported, so a bad
command line is refused in a fraction of a second (before the engine, torch and the
models load)."""

from __future__ import annotations

import argparse
import ipaddress
import math
from typing import Any
from urllib.parse import urlsplit

from rapido.bench.traces import PROFILES

#: --viewers: each decodes Opus in the bench process, on the cores the node uses too.
MAX_VIEWERS = 16


def check_url(url: str, *, allow_remote: bool) -> str | None:
    """One line saying what is wrong with ``url``, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--http: {url!r} is not an http(s)://host[:port] URL"
    if not allow_remote and not _is_loopback(parts.hostname):
        return (f"--http: {parts.hostname} is not a loopback address; the bench only "
                "sends traffic to this machine unless --allow-remote is given")
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate(args: argparse.Namespace) -> str | None:
    """The first problem with the bench arguments, as one line, or None."""
    if args.streams < 1:
        return "--streams must be >= 1"
    if not (math.isfinite(args.duration) and args.duration > 0):
        return "--duration must be > 0"
    if not (math.isfinite(args.warmup) and args.warmup >= 0):
        return "--warmup must be >= 0"
    if not 0.0 <= args.speech <= 1.0:
        return "--speech must be within 0..1"
    if args.jitter not in PROFILES:
        return f"--jitter: unknown profile {args.jitter!r}; choose one of {', '.join(PROFILES)}"
    if args.max_streams_search < 1:
        return "--max-streams-search must be >= 1"
    if args.gpu_cost_per_hour is not None and not (math.isfinite(args.gpu_cost_per_hour)
                                                   and args.gpu_cost_per_hour >= 0):
        return "--gpu-cost-per-hour must be a number >= 0"
    if not (math.isfinite(args.standin_latency_ms) and 0 <= args.standin_latency_ms <= 1000):
        return "--standin-latency-ms must be within 0..1000"
    if args.model == "standin" and args.http:
        return "--model standin runs in-process; a server over --http serves its own model"
    if args.profile and (args.capacity or args.compare or args.http):
        return "--profile records one in-process run: not with --capacity, --compare, --http"
    if args.capacity and args.compare:
        return "--capacity and --compare cannot be combined"
    if args.http:
        problem = check_url(args.http, allow_remote=args.allow_remote)
        if problem:
            return problem
        if args.capacity or args.compare:
            return "--http measures one ramp; it cannot be combined with --capacity/--compare"
        if not (math.isfinite(args.ramp) and args.ramp >= 0):
            return "--ramp must be >= 0"
    if args.viewers:
        if not args.http or args.sink != "webrtc":
            return "--viewers watches sessions over WHEP: it needs --http and --sink webrtc"
        if not 0 < args.viewers <= min(args.streams, MAX_VIEWERS):
            return f"--viewers must be within 1..min(--streams, {MAX_VIEWERS})"
    if args.plot and args.http:
        return "--plot needs in-process runs (not --http)"
    return None


# -- rapido bench cluster --------------------------------------------------------------------

#: The phases of ``bench cluster``, in order (rapido.bench.cluster.PHASES runs them).
CLUSTER_PHASES = ("join", "tags", "bytes_idle", "bytes_churn", "churn_serial", "join_one",
                  "loss", "kill")
#: The phases of ``bench cluster --nodes`` (rapido.bench.cluster_nodes.NODE_PHASES runs them).
NODE_PHASE_NAMES = ("proxy_rest", "proxy_ws", "media_load", "scale", "node_kill")


def add_cluster_parser(sub: Any) -> argparse.ArgumentParser:
    """``rapido bench cluster``: a sub-command of ``bench`` (``sub``: its subparsers)."""
    c: argparse.ArgumentParser = sub.add_parser(
        "cluster", help="Serf agents in a network namespace: convergence, failure "
        "detection, false positives under loss, gossip bytes (needs root)",
        description="Start N real Serf agents (LAN profile, encrypted, rapido's tags) in a "
        "network namespace of their own (unshare --net; needs root) and measure join "
        "convergence, tag propagation, kill -9 detection, false positives under random "
        "UDP loss (nftables) and gossip bytes per node.")
    c.add_argument("--agents", metavar="N[,N...]",
                   help="agent counts, one namespace each, side by side (e.g. 5,50,100)")
    c.add_argument("--nodes", type=int, metavar="M",
                   help="instead of agents: M rapido nodes (--model none) in a namespace: "
                   "proxy cost (REST, WebSocket streams), false positives at full media "
                   "load under 10 %% UDP loss (--load-s), and a kill -9 of a lesson's "
                   "owner until every survivor answers the lesson again (M >= 3 for the "
                   "kill)")
    c.add_argument("--streams", type=int, default=32, metavar="K",
                   help="--nodes: WebSocket speakers per proxy_ws run (default 32)")
    c.add_argument("--stream-s", type=float, default=10.0, metavar="S",
                   help="--nodes: seconds each speaker streams (default 10)")
    c.add_argument("--load-s", type=float, default=60.0, metavar="S",
                   help="--nodes: media_load: every node at full media load (streams "
                   "recording MP4s, raised until the machine is busy), then S seconds "
                   "of 10 %% UDP loss on the gossip ports watching every node's member "
                   "view for false positives (default 60; 0 skips the phase)")
    c.add_argument("--rest-requests", type=int, default=300, metavar="K",
                   help="--nodes: GETs per path in proxy_rest (default 300)")
    c.add_argument("--loss-s", type=float, default=60.0, metavar="S",
                   help="seconds of 10 %% UDP loss while counting false positives "
                   "(default 60)")
    c.add_argument("--bytes-s", type=float, default=60.0, metavar="S",
                   help="seconds each gossip byte count lasts (default 60; memberlist "
                   "pushes/pulls every 30 s up to 32 members, every 90 s at 100)")
    c.add_argument("--sample", type=int, default=50, metavar="K",
                   help="agents read per 0.5 s round while watching loss, in turn "
                   "(default 50: every agent every 0.5 s up to 50 agents, every 1 s at "
                   "100); every agent's member events are watched besides")
    c.add_argument("--phases", metavar="LIST",
                   help=f"only these phases (join always runs): {','.join(CLUSTER_PHASES)}; "
                   f"with --nodes: {','.join(NODE_PHASE_NAMES)}")
    c.add_argument("--json", dest="json_file", metavar="FILE",
                   help="also write the results as JSON to FILE ('-': stdout, no table)")
    return c


def parse_counts(text: str) -> list[int]:
    """``5,50,100`` -> [5, 50, 100]; ValueError naming the bad part."""
    counts = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 2 <= int(part) <= 1000:
            raise ValueError(f"--agents: {part!r} is not a count in 2..1000")
        counts.append(int(part))
    return counts


def validate_cluster(args: argparse.Namespace) -> str | None:
    """The first problem with the ``bench cluster`` arguments, as one line, or None."""
    if args.nodes is not None:
        return _validate_nodes(args)
    if not args.agents:
        return "--agents or --nodes is required"
    try:
        parse_counts(args.agents)
    except ValueError as e:
        return str(e)
    if not (math.isfinite(args.loss_s) and args.loss_s > 0):
        return "--loss-s must be > 0"
    if not (math.isfinite(args.bytes_s) and args.bytes_s >= 5):
        return "--bytes-s must be >= 5"
    if args.sample < 1:
        return "--sample must be >= 1"
    if args.phases:
        unknown = set(args.phases.split(",")) - set(CLUSTER_PHASES)
        if unknown:
            return (f"--phases: unknown {', '.join(sorted(unknown))}; "
                    f"known: {', '.join(CLUSTER_PHASES)}")
    return None


def _validate_nodes(args: argparse.Namespace) -> str | None:
    if args.agents:
        return "--nodes and --agents are separate runs: give one"
    if not 2 <= args.nodes <= 16:
        return "--nodes must be within 2..16"
    if not 1 <= args.streams <= 200:
        return "--streams must be within 1..200"
    if not (math.isfinite(args.stream_s) and 1 <= args.stream_s <= 600):
        return "--stream-s must be within 1..600"
    if not (math.isfinite(args.load_s) and 0 <= args.load_s <= 3600):
        return "--load-s must be within 0..3600"
    if not 10 <= args.rest_requests <= 100_000:
        return "--rest-requests must be within 10..100000"
    phases = args.phases.split(",") if args.phases else list(NODE_PHASE_NAMES)
    unknown = set(phases) - set(NODE_PHASE_NAMES)
    if unknown:
        return (f"--phases: unknown {', '.join(sorted(unknown))}; known with --nodes: "
                f"{', '.join(NODE_PHASE_NAMES)}")
    if "node_kill" in phases and args.nodes < 3:
        return "--nodes: node_kill needs at least 3 (a kill leaves 2 to agree)"
    return None
