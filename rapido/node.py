"""One node: engine + HTTP (+ the cluster, when ``join`` is set) and its lifecycle.

Shutdown order, as aiohttp would have it: stop admitting (``/ready`` goes 503) -> let
speech in flight finish, up to the drain timeout -> close sessions (sinks finalise,
clients get ``closed``) -> stop the listener and cancel what is left. The cluster starts
once the listener is bound (its URL, with the real port, goes in its tags) and stops
first: the node leaves the cluster (others see it ``left``), then its sessions close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from rapido.cluster.agent import SerfAgentConfigError
from rapido.cluster.serf import SerfError
from rapido.config import Config, is_loopback
from rapido.engine import Engine
from rapido.http.app import make_app
from rapido.http.locate import Locate
from rapido.metrics import Metrics
from rapido.wiring import build_cluster, build_engine, http_settings

log = logging.getLogger(__name__)


class _ClientProtocolErrors(logging.Filter):
    """aiohttp logs a malformed request line or header from a client with a traceback at
    ERROR; it already answered 400, so that is the client's fault, not ours: keep it at
    DEBUG so the error log stays for our own faults."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            log.debug("bad HTTP from a client: %s", exc)
            return False
        return True


_CLIENT_ERRORS = _ClientProtocolErrors()


class Node:
    def __init__(self, config: Config, metrics: Metrics | None = None, *,
                 locate: Locate | None = None) -> None:
        """``locate``: where each session lives, for a node that relays requests for
        sessions on other nodes (``rapido.http.proxy``); None serves every one here."""
        self.config = config
        self.metrics = metrics or Metrics()
        self.engine: Engine = build_engine(config, self.metrics)
        self.cluster = build_cluster(config, self.engine, self.metrics)
        self.app = make_app(http_settings(config), self.metrics, self.engine, self.cluster,
                            locate=locate)
        self.runner: web.AppRunner | None = None
        self.port = config.port

    @property
    def url(self) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        host = self.config.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        # Once per process however many nodes it runs (a filter is added only once).
        logging.getLogger("aiohttp.server").addFilter(_CLIENT_ERRORS)
        # keepalive_timeout is also aiohttp's header timeout: a connection whose request
        # has not fully arrived when it fires is closed (the body has its own timeout,
        # http/app.py: body_middleware). After a refusal, what is left of a body is read
        # and dropped for at most as long (lingering_time), then the connection closes.
        read_timeout = self.config.http_read_timeout_s
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                    shutdown_timeout=5.0, keepalive_timeout=read_timeout,
                                    lingering_time=min(10.0, read_timeout))
        await self.runner.setup()  # runs cleanup_ctx: the engine starts here
        site = web.TCPSite(self.runner, self.config.host, self.config.port,
                           reuse_address=True)
        await site.start()
        if self.runner.addresses:  # the port bound (port 0 picks a free one)
            self.port = self.runner.addresses[0][1]
        if not self.config.node_id:
            self.engine.node_id = f"{socket.gethostname()}-{self.port}"
        if self.cluster is not None:
            try:
                await self.cluster.start(self.engine.node_id, self.url)
            except BaseException:
                await self.stop()
                raise
        if not self.config.auth_required:
            log.warning("no api_key configured: listening on loopback %s only",
                        self.config.host)

    async def drain(self, timeout_s: float | None = None) -> bool:
        timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
        log.info("draining: no new sessions; waiting up to %.0f s for speech in flight",
                 timeout)
        quiet = await self.engine.drain(timeout)
        if not quiet:
            log.warning("drain timeout: closing %d sessions with speech in flight",
                        sum(s.busy for s in self.engine.sessions.values()))
        return quiet

    async def stop(self) -> None:
        if self.cluster is not None:
            await self.cluster.aclose()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def serve(config: Config) -> int:
    """Run a node until SIGTERM/SIGINT; drain, then exit 0."""
    node = Node(config)
    try:
        await node.start()
    except (SerfError, SerfAgentConfigError) as exc:
        log.error("cannot start the cluster: %s", exc)
        return 1
    print(f"rapido serving at {node.url}/  (health {node.url}/health)", flush=True)
    if not is_loopback(config.host) and config.auth_required:
        log.info("listening on %s with API key auth", config.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutdown requested")
    try:
        await node.drain()
    finally:
        await node.stop()
    log.info("stopped")
    return 0
