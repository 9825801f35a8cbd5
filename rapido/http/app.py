"""The aiohttp application: preserved paths, middlewares, and the engine's lifetime.

Middlewares, outermost first: metrics (every request counted by route and status) ->
errors (everything becomes ``{"error", "message"}`` JSON) -> auth (``/api``, ``/ws``;
``/whep`` takes viewer tokens, see ``whep.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path

from aiohttp import WSCloseCode, web

from rapido import __version__
from rapido.engine import Engine
from rapido.http import api, demo, whep, ws
from rapido.http.auth import check_bearer, needs_auth
from rapido.http.errors import ApiError, json_response
from rapido.http.keys import ENGINE, METRICS, SETTINGS, UPLOADS, WEBSOCKETS
from rapido.http.openapi import openapi_document
from rapido.http.settings import HttpSettings
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
    key = request.app[SETTINGS].api_key
    if key and needs_auth(request.path):
        check_bearer(request, key)
    return await handler(request)


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
    engine = request.app[ENGINE]
    body = {"ready": engine.ready and not engine.draining, **engine.summary()}
    if engine.draining:
        return json_response({**body, "reason": "draining"}, status=503)
    if not engine.ready:
        return json_response({**body, "reason": "starting"}, status=503)
    return json_response(body)


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

def make_app(settings: HttpSettings, metrics: Metrics, engine: Engine) -> web.Application:
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[ENGINE] = engine
    app[WEBSOCKETS] = set()
    app[UPLOADS] = UploadSlots(settings.max_concurrent_uploads)
    app.add_routes([
        web.get("/health", health),
        web.get("/ready", ready),
        web.get("/metrics", metrics_endpoint),
        web.get("/api/openapi.json", openapi),
        web.get("/", index),
        web.static("/static", _static_dir()),
    ])
    app.add_routes(api.routes)
    app.add_routes(ws.routes)
    demo.setup(app)  # POST /api/demo: the viewer page's Demo button
    # /whep is outside the API-key middleware (auth.needs_auth): viewers present a
    # per-session viewer token instead, checked in whep.py.
    whep.setup(app)
    app.cleanup_ctx.append(_engine_ctx)
    app.on_shutdown.append(_close_websockets)
    return app


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    await engine.start()
    yield
    await engine.aclose()


async def _close_websockets(app: web.Application) -> None:
    socks = app[WEBSOCKETS].copy()
    for sock in socks:
        await sock.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
