"""One node: engine + HTTP (+ the cluster, when ``join`` or ``serf_rpc`` is set) and its
lifecycle.

A drain starts on SIGTERM, SIGINT or ``POST /api/admin/drain`` (:meth:`Node.request_drain`,
idempotent): stop admitting at once (``/ready`` goes 503; in a cluster the node's tags say
``draining`` right away, so no other node places a lesson on it) -> let speech in flight
finish, up to ``drain_timeout_s``, still a member of the cluster -> close the sessions
left (sinks finalise, WebSocket clients get ``closed``: reason ``moved`` in a cluster,
where a client reconnects through any node and lands on another owner, ``shutdown`` on a
single node) -> leave the cluster gracefully (others see it ``left``, not ``failed``) ->
stop the listener and cancel what is left. The cluster starts once the listener is bound
(its URL, with the real port, goes in its tags).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from rapido.cluster.agent import SerfAgentConfigError
from rapido.cluster.placement import MOVED, Affinity
from rapido.cluster.release import Release
from rapido.cluster.serf import SerfError
from rapido.config import Config, ConfigError, is_loopback
from rapido.engine import Engine
from rapido.heap import GcPauses, freeze_heap
from rapido.http.app import make_app, websockets_done
from rapido.http.keys import DrainControl
from rapido.http.locate import Locate
from rapido.metrics import Metrics
from rapido.pipeline.session import StreamSession
from rapido.wiring import (
    NodeHealth,
    build_cluster,
    build_engine,
    build_release,
    build_router,
    http_settings,
    publish_scale_signals,
    remember_lessons,
)

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
#: How long the node waits, after closing its sessions, for their WebSocket clients to
#: have been told (``closed``) and to have closed, before it goes on stopping.
WEBSOCKET_GOODBYE_S = 2.0


class Node:
    def __init__(self, config: Config, metrics: Metrics | None = None, *,
                 locate: Locate | None = None) -> None:
        """``locate``: where each session lives, for a node that relays requests for
        sessions on other nodes (``rapido.http.proxy``); None serves every one here."""
        self.config = config
        self.metrics = metrics or Metrics()
        clustered = config.clustered
        affinity = Affinity()
        self.health = NodeHealth(self.metrics)
        remember = remember_lessons(affinity)

        def on_session(session: StreamSession, created: bool) -> None:
            self.health.on_session(session, created)
            if clustered:
                remember(session, created)

        self.engine: Engine = build_engine(config, self.metrics, on_session=on_session)
        self.release: Release | None = None
        self.cluster = build_cluster(
            config, self.engine, self.metrics, self.health,
            lambda: self.release.state.epoch if self.release is not None else 0)
        if self.cluster is not None:
            self.release = build_release(config, self.cluster, self.metrics, self.health)
            self.cluster.on_view(publish_scale_signals(self.cluster, self.metrics))
        self.router = (build_router(config, self.engine, self.cluster, affinity, self.release)
                       if self.cluster is not None else None)
        #: Set by :meth:`request_drain`: whoever runs the node (``serve``) drains and
        #: stops it then.
        self.drain_requested = asyncio.Event()
        self.app = make_app(http_settings(config), self.metrics, self.engine, self.cluster,
                            self.router,
                            drain=DrainControl(start=self.request_drain,
                                               timeout_s=config.drain_timeout_s),
                            locate=locate, release=self.release,
                            health_window=self.health.window)
        self.runner: web.AppRunner | None = None
        self.port = config.port
        self.gc_pauses = GcPauses(
            lambda generation, s: self.metrics.gc_pause.labels(str(generation)).observe(s))

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

    @property
    def cluster_url(self) -> str:
        """Where the other nodes of the cluster reach this one (its tags carry it)."""
        return self.config.cluster_url.rstrip("/") or self.url

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
        self.gc_pauses.install()
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
                await self.cluster.start(self.engine.node_id, self.cluster_url)
                if self.router is not None:
                    await self.router.start()
                if self.release is not None:
                    await self.release.start()
            except BaseException:
                await self.stop()
                raise
        if not self.config.auth_required:
            log.warning("no api_key configured: listening on loopback %s only",
                        self.config.host)

    def request_drain(self) -> None:
        """SIGTERM, SIGINT and ``POST /api/admin/drain``: stop admitting now (and say so
        in the cluster's tags at once), and ask the runner of this node to drain and stop
        it (:attr:`drain_requested`). Idempotent."""
        if not self.engine.draining:
            log.info("drain requested: no new sessions from now on")
        self.engine.stop_admitting()
        if self.cluster is not None:
            self.cluster.tags_changed()
        self.drain_requested.set()

    async def drain(self, timeout_s: float | None = None) -> bool:
        timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
        self.request_drain()
        log.info("draining: no new sessions; waiting up to %.0f s for speech in flight",
                 timeout)
        quiet = await self.engine.drain(timeout)
        if not quiet:
            log.warning("drain timeout: closing %d sessions with speech in flight",
                        sum(s.busy for s in self.engine.sessions.values()))
        return quiet

    async def stop(self) -> None:
        """Close the sessions (``moved`` in a cluster, ``shutdown`` alone), then leave
        the cluster, then stop serving: a member, draining, until its lessons closed."""
        if self.runner is not None and self.engine.sessions:
            reason = MOVED if self.cluster is not None else "shutdown"
            log.info("closing %d sessions (%s)", len(self.engine.sessions), reason)
            self.engine.stop_admitting()
            await self.engine.close_all(reason)
            await websockets_done(self.app, WEBSOCKET_GOODBYE_S)
        if self.release is not None:
            await self.release.aclose()
        if self.router is not None:
            await self.router.aclose()
        if self.cluster is not None:
            await self.cluster.aclose()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.gc_pauses.close()


async def serve(config: Config) -> int:
    """Run a node until SIGTERM/SIGINT or ``POST /api/admin/drain``; drain, then exit 0.
    Exit 1: the cluster's agent could not be started or reached; 2: a setting is wrong
    (an external agent with another name, or refusing our RPC token)."""
    try:
        node = Node(config)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return 2
    try:
        await node.start()
    except SerfAgentConfigError as exc:
        log.error("cannot start the cluster: %s", exc)
        return 2
    except SerfError as exc:
        log.error("cannot start the cluster: %s", exc)
        return 1
    if config.gc_freeze:
        # The model, avatars and every import are loaded: from here full collections
        # walk only what the sessions make (rapido.heap).
        log.info("heap frozen: %d objects", freeze_heap())
    print(f"rapido serving at {node.url}/  (health {node.url}/health)", flush=True)
    if not is_loopback(config.host) and config.auth_required:
        log.info("listening on %s with API key auth", config.host)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.request_drain)
    await node.drain_requested.wait()
    log.info("shutdown requested")
    try:
        await node.drain()
    finally:
        await node.stop()
    log.info("stopped")
    return 0
