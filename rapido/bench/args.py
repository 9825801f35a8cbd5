"""Checks of ``rapido bench`` arguments that need nothing heavy imported, so a bad
command line is refused in a fraction of a second (before the engine, torch and the
models load)."""

from __future__ import annotations

import argparse
import ipaddress
import math
from urllib.parse import urlsplit

from rapido.bench.traces import PROFILES


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
    if args.plot and args.http:
        return "--plot needs in-process runs (not --http)"
    return None
