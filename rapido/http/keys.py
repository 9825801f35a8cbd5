"""Typed application keys: the node's long-lived services, no globals."""

from __future__ import annotations

from aiohttp import web

from rapido.cluster.service import Cluster
from rapido.engine import Engine
from rapido.http.locate import Locate
from rapido.http.settings import HttpSettings
from rapido.http.uploads import UploadSlots
from rapido.metrics import Metrics

SETTINGS = web.AppKey("settings", HttpSettings)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse])
#: The secret of the sessions' WebSocket tokens (``rapido.http.tokens``).
WS_SECRET = web.AppKey("ws_secret", bytes)
UPLOADS = web.AppKey("uploads", UploadSlots)
#: Present on a clustered node only (``join`` set).
CLUSTER = web.AppKey("cluster", Cluster)
#: Where each session lives (``rapido.http.proxy``); absent on a single node, where
#: every session is served here.
LOCATE: web.AppKey[Locate] = web.AppKey("locate")


def base_url(request: web.Request) -> str:
    """The URL clients reach this node at: configured, or what the request came to."""
    configured = request.app[SETTINGS].public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"
