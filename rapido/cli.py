"""Command line: ``rapido serve`` and ``rapido bench``. Kept thin: it parses, loads the
Config, and hands over."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from rapido import __version__
from rapido.bench.args import add_cluster_parser
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

    bench = sub.add_parser("bench", help="measure how many real-time streams a process holds "
                           "(or, bench cluster, the gossip layer)",
                           description="Run N synthetic streams through the real pipeline "
                           "in-process (or against a running server with --http) and report "
                           "delivered fps, lateness, speech onset, batching and CPU. "
                           "`rapido bench cluster --help`: the cluster's Serf agents.")
    bench.add_argument("--config", metavar="FILE", help="TOML file for the node settings")
    bench.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    bench.add_argument("--duration", type=float, default=10.0,
                       help="seconds to measure (default 10)")
    bench.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    bench.add_argument("--speech", type=float, default=1.0,
                       help="speech duty cycle 0..1 (default 1.0: always speaking; 0.5: "
                       "3 s utterances with 3 s pauses)")
    bench.add_argument("--jitter", default="steady", metavar="PROFILE",
                       help="audio arrival profile: steady, moderate, heavy, tts_fast, "
                       "stalls (default steady: exactly real time)")
    bench.add_argument("--sink", choices=("null", "record", "webrtc"), default="null",
                       help="where frames go: null (none), record (H.264+AAC MP4 per "
                       "stream), webrtc (H.264+Opus encoders per stream, running with no "
                       "viewer)")
    bench.add_argument("--adaptive", action="store_true",
                       help="let publishers shed frame rate under load down to the "
                       "config's min_fps (default: full frame rate, what capacity means)")
    bench.add_argument("--capacity", action="store_true",
                       help="search the largest stream count that stays real time")
    bench.add_argument("--max-streams-search", type=int, default=512,
                       help="upper bound of the --capacity search")
    bench.add_argument("--compare", choices=("batching", "stretch"),
                       help="batching: run with the configured max_batch and with "
                       "max_batch=1, one after the other, and compare; stretch: run with "
                       "jitter_stretch off, then on")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="plot delivered fps and p99 lateness against streams "
                       "(needs matplotlib)")
    bench.add_argument("--gpu-cost-per-hour", type=float, metavar="X",
                       help="machine price per hour: print the cost per concurrent stream "
                       "per month (X * 730 / capacity)")
    bench.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                       help="progress bar on stderr (auto: when stderr is a terminal)")
    bench.add_argument("--model", help="model for speaking frames: rapido-lite, wav2lip-96, "
                       "none, or standin: a free model that only waits --standin-latency-ms "
                       "a batch with the GIL released, as a GPU call does (the bench only; "
                       "default: the config's)")
    bench.add_argument("--profile", metavar="FILE",
                       help="record where the GIL goes over the measured window with "
                       "py-spy: FILE gets the collapsed stacks, FILE.svg a flame graph, "
                       "and the table GIL-held time per stage per speaking stream-frame "
                       "(one run; needs py-spy and ptrace rights over this process)")
    bench.add_argument("--standin-latency-ms", type=float, default=5.0, metavar="MS",
                       help="--model standin: the wait per batch (default 5)")
    bench.add_argument("--backend", choices=("auto", "onnx", "torch"), help="model backend")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), help="model device")
    bench.add_argument("--max-batch", type=int, help="largest model batch")
    bench.add_argument("--max-wait-ms", type=float, help="batch fill wait")
    http = bench.add_argument_group("driving a running server (--http)")
    http.add_argument("--http", metavar="URL",
                      help="drive the server at URL through /api and /ws instead of "
                      "in-process (loopback only unless --allow-remote)")
    http.add_argument("--api-key", help="bearer key for the server's /api and /ws")
    http.add_argument("--ramp", type=float, default=2.0,
                      help="seconds over which the streams are started (default 2)")
    http.add_argument("--viewers", type=int, default=0, metavar="K",
                      help="with --sink webrtc: a WHEP viewer (aiortc, audio) on each of "
                      "the first K sessions, for speech to first audible audio at a "
                      "viewer (default 0)")
    http.add_argument("--allow-remote", action="store_true",
                      help="allow a --http URL that is not a loopback address")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="[cluster]")
    add_cluster_parser(kinds)

    model = sub.add_parser("model", help="build or check lip-sync models",
                           description="Build the built-in models (deterministic ONNX "
                           "exports with a manifest) or check a model against its manifest.")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    build = msub.add_parser("build", help="export a built-in model to ONNX + manifest")
    build.add_argument("--model", default="rapido-lite", choices=("rapido-lite", "wav2lip-96"))
    build.add_argument("--out", metavar="DIR", help="output folder (default: the model cache)")
    check = msub.add_parser("check", help="validate a manifest and its ONNX graph")
    check.add_argument("manifest", help="the manifest file (.json)")

    avatar = sub.add_parser("avatar", help="manage avatars",
                            description="Make avatars from your own pictures.")
    asub = avatar.add_subparsers(dest="avatar_command", required=True, metavar="ACTION")
    imp = asub.add_parser("import", help="make an avatar from an image or a short video")
    imp.add_argument("source", metavar="IMAGE_OR_VIDEO")
    imp.add_argument("--face-box", required=True, metavar="X,Y,W,H",
                     help="the face in source pixels")
    imp.add_argument("--name", required=True, help="the name sessions use ([A-Za-z0-9_.-])")
    imp.add_argument("--avatars-dir", help="where to save (default: the config's avatars_dir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench" and args.bench_kind == "cluster":
        logging.basicConfig(level="WARNING",
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from rapido.bench.cluster import cluster_main

        return cluster_main(args)
    try:
        if args.command == "serve":
            config = Config.load(toml_path=args.config, overrides=flag_overrides(args))
            from rapido.wiring import load_regions

            load_regions(config)  # a bad regions file stops here, as one line
        elif args.command == "bench":
            config = Config.load(toml_path=args.config, overrides={
                # The stand-in is the bench's own (rapido.bench.standin), not a setting.
                "model": None if args.model == "standin" else args.model,
                "max_batch": args.max_batch,
                "max_wait_ms": args.max_wait_ms, "backend": args.backend,
                "device": args.device})
        else:
            config = Config.load()
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
    if args.command == "model":
        return _model(config, args)
    if args.command == "avatar":
        return _avatar(config, args)
    from rapido.bench.args import validate

    problem = validate(args)
    if problem:
        print(f"rapido: bench: {problem}", file=sys.stderr)
        return 2
    if args.http:  # a running server over its real API
        from rapido.bench.http import http_main

        return http_main(config, args)
    from rapido.bench.run import bench_main

    return bench_main(config, args)


def _model(config: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from rapido.gpu.manifest import ModelError, check_onnx, load_manifest
    from rapido.gpu.registry import build_builtin, default_model_dir

    try:
        if args.model_command == "build":
            root = Path(config.model_dir) if config.model_dir else default_model_dir()
            out = Path(args.out) if args.out else root / args.model
            path = build_builtin(args.model, out)
            print(f"built {args.model}: {path}")
            return 0
        manifest = load_manifest(args.manifest)
        if manifest.format == "onnx":
            check_onnx(manifest)
        print(f"ok: {manifest.name} ({manifest.format}, crop {manifest.crop_size})")
        return 0
    except ModelError as exc:
        print(f"rapido: model: {exc}", file=sys.stderr)
        return 2


def _avatar(config: Config, args: argparse.Namespace) -> int:
    from rapido.gpu.avatar_import import AvatarImportError, import_to_dir, parse_box

    try:
        path = import_to_dir(args.source, parse_box(args.face_box), args.name,
                             args.avatars_dir or config.avatars_dir, width=config.width,
                             height=config.height, fps=config.fps)
    except AvatarImportError as exc:
        print(f"rapido: avatar: {exc}", file=sys.stderr)
        return 2
    print(f"avatar {args.name!r} saved to {path}; sessions can use \"avatar\": "
          f"\"{args.name}\"")
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
