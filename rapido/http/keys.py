"""Typed application keys: the node's long-lived services, no globals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from rapido.cluster.health import HealthWindow
from rapido.cluster.release import Release
from rapido.cluster.service import Cluster
from rapido.engine import Engine
from rapido.http.forwarded import forwarded_host, forwarded_proto
from rapido.http.locate import Locate
from rapido.http.routing import Router
from rapido.http.settings import HttpSettings
from rapido.http.uploads import UploadSlots
from rapido.metrics import Metrics


@dataclass(frozen=True)
class DrainControl:
    """How ``POST /api/admin/drain`` starts the node's drain: ``start()`` does what
    SIGTERM does (idempotent; the node then drains for up to ``timeout_s`` and stops)."""

    start: Callable[[], None]
    timeout_s: float


SETTINGS = web.AppKey("settings", HttpSettings)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse])
#: The secret of the sessions' WebSocket tokens (``rapido.http.tokens``).
WS_SECRET = web.AppKey("ws_secret", bytes)
UPLOADS = web.AppKey("uploads", UploadSlots)
#: Present on a clustered node only (``join`` set).
CLUSTER = web.AppKey("cluster", Cluster)
#: Present with CLUSTER: where lessons and sessions are served (``routing.py``).
ROUTER = web.AppKey("router", Router)
#: Present with CLUSTER: the rollout (``rollout.py``).
RELEASE = web.AppKey("release", Release)
#: The node's health window, present only with ``health_drills`` on (``rollout.py``).
HEALTH = web.AppKey("health", HealthWindow)
#: Present when the app runs in a node that can be drained over HTTP.
DRAIN = web.AppKey("drain", DrainControl)
#: Where each session lives (``rapido.http.proxy``); absent on a single node, where
#: every session is served here.
LOCATE: web.AppKey[Locate] = web.AppKey("locate")


def base_url(request: web.Request) -> str:
    """The URL clients reach this node at: configured, or what the request came to (on
    a request forwarded by another node of the cluster, what the client asked that one:
    the URLs in an answer lead back through the node the client chose)."""
    configured = request.app[SETTINGS].public_url
    if configured:
        return configured.rstrip("/")
    return f"{forwarded_proto(request)}://{forwarded_host(request)}"
