"""Command line: ``rapido serve`` and ``rapido bench``. Kept thin: it parses, loads the
Config, and hands over."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from rapido import __version__
from rapido.config import Config, ConfigError, add_flags, flag_overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rapido", description="Speech audio in, a lip-synced talking-avatar stream out.")
    p.add_argument("--version", action="version", version=f"rapido {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a node (HTTP API, WebSocket, streams)",
                           description="Run a node. Every flag is also a RAPIDO_* "
                           "environment variable and a key of the --config TOML file.")
    serve.add_argument("--config", metavar="FILE", help="TOML file (flat, or a [rapido] table)")
    add_flags(serve)

    bench = sub.add_parser("bench", help="measure how many real-time streams a process holds",
                           description="Run N synthetic streams through the real pipeline "
                           "in-process and report delivered fps, lateness and CPU.")
    bench.add_argument("--config", metavar="FILE", help="TOML file for the node settings")
    bench.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    bench.add_argument("--duration", type=float, default=10.0,
                       help="seconds to measure (default 10)")
    bench.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    bench.add_argument("--speech", type=float, default=1.0,
                       help="speech duty cycle 0..1 (default 1.0: always speaking)")
    bench.add_argument("--sink", choices=("null", "record"), default="null")
    bench.add_argument("--capacity", action="store_true",
                       help="search the largest stream count that stays real time")
    bench.add_argument("--max-streams-search", type=int, default=512,
                       help="upper bound of the --capacity search")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            config = Config.load(toml_path=args.config, overrides=flag_overrides(args))
        else:
            config = Config.load(toml_path=args.config)
    except ConfigError as exc:
        print(f"rapido: config error: {exc}", file=sys.stderr)
        return 2
    level = config.log_level.upper()
    if args.command == "bench" and level in ("DEBUG", "INFO"):
        level = "WARNING"  # a session line per stream would bury the table
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _install_uvloop()
    if args.command == "serve":
        from rapido.node import serve

        return asyncio.run(serve(config))
    from rapido.bench.run import bench_main

    return bench_main(config, args)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
