"""The aiohttp application: preserved paths, middlewares, and the engine's lifetime.

Middlewares, outermost first: metrics (every request counted by route and status) ->
errors (everything becomes ``{"error", "message"}`` JSON) -> auth (with a key: ``/api``,
``/ws``; ``/whep`` takes viewer tokens, see ``whep.py``; without one: Host and Origin,
see ``auth.py``) -> proxy (in a cluster, a session on another node is relayed there,
its body streamed: see ``proxy.py``) -> body (the request body read within
``http_read_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web

from rapido import __version__
from rapido.cluster.health import HealthWindow
from rapido.cluster.release import Release
from rapido.cluster.service import Cluster
from rapido.engine import Engine
from rapido.http import admin, api, demo, proxy, rollout, whep, ws
from rapido.http.auth import check_bearer, check_local, has_key, needs_auth
from rapido.http.cluster import cluster_summary
from rapido.http.cluster import routes as cluster_routes
from rapido.http.errors import ApiError, json_response
from rapido.http.keys import (
    CLUSTER,
    DRAIN,
    ENGINE,
    HEALTH,
    METRICS,
    RELEASE,
    ROUTER,
    SETTINGS,
    UPLOADS,
    WEBSOCKETS,
    WS_SECRET,
    DrainControl,
)
from rapido.http.locate import Locate
from rapido.http.openapi import openapi_document
from rapido.http.routing import Router
from rapido.http.settings import HttpSettings
from rapido.http.tokens import WS_PURPOSE, derive_secret
from rapido.http.uploads import UploadSlots
from rapido.metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        route = _route_name(request)
        m = request.app[METRICS]
        m.http_requests.labels(route, request.method, str(status)).inc()
        m.http_duration.labels(route, request.method).observe(time.perf_counter() - start)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status < 500:
            request.app[METRICS].bad_input.labels("http", exc.code).inc()
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed",
                413: "body_too_large"}.get(exc.status, exc.reason.lower().replace(" ", "_"))
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") \
            else exc.reason
        if exc.status == 413:
            message = (f"request body is over the {request.app[SETTINGS].max_body_bytes} "
                       "byte limit")
        elif exc.status == 404:
            message = f"no such path: {request.path}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return json_response({"error": code, "message": message}, status=exc.status,
                             headers=headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response({"error": "internal", "message": "internal server error"},
                             status=500)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if not settings.api_key:
        check_local(request, settings.public_url)
    elif needs_auth(request.path):
        check_bearer(request, settings.api_key, request.app[WS_SECRET])
    return await handler(request)


@web.middleware
async def body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A client trickling its body slower than ``http_read_timeout_s`` is answered 408
    and cut off (aiohttp has no body timeout of its own): if the body has not fully
    arrived by then, the handler is cancelled (it can only be waiting for the body, or
    on what it does with it, which is still the client's clock). Handlers read the body
    themselves, as much of it as they want (a 429 before reading, WHEP's 64 KiB), so
    nothing here buffers one. aiohttp then reads and drops what is left of the body for
    ``lingering_time`` before it closes, so the client sees the 408, not a reset."""
    if not request.can_read_body:
        return await handler(request)
    timeout = request.app[SETTINGS].http_read_timeout_s
    me = asyncio.current_task()
    assert me is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        if not request.content.is_eof():
            expired = True
            me.cancel()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await handler(request)
    except asyncio.CancelledError:
        if not expired or me.uncancel() > 0:
            raise  # cancelled from outside too (the client left, the node stops)
        request.app[METRICS].bad_input.labels("http", "request_timeout").inc()
        response = ApiError(
            408, "request_timeout",
            f"the request body did not arrive within {timeout:g} s (http_read_timeout_s); "
            "send it at once").response()
        response.force_close()
        return response
    finally:
        timer.cancel()


def _route_name(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or getattr(info, "http_exception", None) is not None:
        return "unmatched"
    return str(resource.canonical)


# -- operational endpoints ----------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    """Readiness and what the node runs. Absolute paths (the model file, caches) are shown
    only to callers presenting the API key; others see ``.../<file name>``. The cluster's
    state (``single``, ``ok``, ``degraded``) never changes readiness: a node that cannot
    reach its cluster serves alone; why (``cluster_error``) is for key holders."""
    engine = request.app[ENGINE]
    summary = {**engine.summary(), **cluster_summary(request.app.get(CLUSTER))}
    if not has_key(request, request.app[SETTINGS].api_key):
        summary = hide_paths(summary)
        summary.pop("cluster_error", None)  # it names addresses: for key holders only
    body = {"ready": engine.ready and not engine.draining, **summary}
    if engine.draining:
        return json_response({**body, "reason": "draining"}, status=503)
    if not engine.ready:
        return json_response({**body, "reason": "starting"}, status=503)
    return json_response(body)


#: An absolute path of at least one directory, anywhere in a string (POSIX or Windows).
_ABS_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])+")


def hide_paths(value: Any) -> Any:
    """``value`` with the directories of absolute paths in its strings replaced by
    ``.../`` (a model at /home/me/models/m.onnx shows as .../m.onnx)."""
    if isinstance(value, str):
        return _ABS_PATH.sub(".../", value)
    if isinstance(value, dict):
        return {k: hide_paths(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [hide_paths(v) for v in value]
    return value


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[SETTINGS]))


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_static_dir() / "index.html")


def _static_dir() -> Path:
    return Path(str(resources.files("rapido.http") / "static"))


# -- the app ------------------------------------------------------------------------------

def make_app(settings: HttpSettings, metrics: Metrics, engine: Engine,
             cluster: Cluster | None = None,
             router: Router | None = None, *,
             drain: DrainControl | None = None,
             locate: Locate | None = None, release: Release | None = None,
             health_window: HealthWindow | None = None) -> web.Application:
    """The node's app. ``locate`` says where each session lives (a cluster: the
    router's, unless given); without either every session URL is served here."""
    app = web.Application(
        # proxy after auth (only authenticated requests are relayed) and before body
        # (a relayed body is streamed to its node, not read here).
        middlewares=[metrics_middleware, error_middleware, auth_middleware,
                     proxy.proxy_middleware, body_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[WS_SECRET] = derive_secret(settings.api_key, WS_PURPOSE)
    app[METRICS] = metrics
    app[ENGINE] = engine
    app[WEBSOCKETS] = set()
    app[UPLOADS] = UploadSlots(settings.max_concurrent_uploads)
    if cluster is not None:
        app[CLUSTER] = cluster  # started by the node once its URL is known
    if router is not None:
        app[ROUTER] = router
    if drain is not None:
        app[DRAIN] = drain  # POST /api/admin/drain
    if release is not None:
        app[RELEASE] = release  # /api/admin/rollout
    if health_window is not None and settings.health_drills:
        app[HEALTH] = health_window  # /api/admin/health/drill
    app.add_routes([
        web.get("/health", health),
        web.get("/ready", ready),
        web.get("/metrics", metrics_endpoint),
        web.get("/api/openapi.json", openapi),
        web.get("/", index),
        web.static("/static", _static_dir()),
    ])
    app.add_routes(api.routes)
    app.add_routes(cluster_routes)
    app.add_routes(admin.routes)
    app.add_routes(rollout.routes)
    app.add_routes(ws.routes)
    demo.setup(app)  # POST /api/demo: the viewer page's Demo button
    # /whep is outside the API-key middleware (auth.needs_auth): viewers present a
    # per-session viewer token instead, checked in whep.py.
    whep.setup(app)
    app.cleanup_ctx.append(_engine_ctx)
    if locate is None and router is not None:
        locate = router.locate
    if locate is not None:
        proxy.setup(app, locate)  # its client session closes before the engine
    app.on_shutdown.append(_close_websockets)
    return app


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    await engine.start()
    yield
    await engine.aclose()


async def websockets_done(app: web.Application, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for every WebSocket to be closed and gone (after their
    sessions closed: their last event, ``closed``, is then on the wire). True if none is
    left."""
    # Polled: a socket leaves the set in its handler's own cleanup (ws.py), which says
    # nothing to anyone; a few checks over at most a couple of seconds, once per stop.
    step = 0.02
    for _ in range(max(1, math.ceil(timeout_s / step))):
        if not app[WEBSOCKETS]:
            return True
        await asyncio.sleep(step)
    return not app[WEBSOCKETS]


async def _close_websockets(app: web.Application) -> None:
    socks = app[WEBSOCKETS].copy()
    for sock in socks:
        await sock.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
