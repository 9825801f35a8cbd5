"""Typed application keys: the node's long-lived services, no globals."""

from __future__ import annotations

from aiohttp import web

from rapido.config import Config
from rapido.engine import Engine
from rapido.metrics import Metrics

CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse])


def base_url(request: web.Request) -> str:
    """The URL clients reach this node at: configured, or what the request came to."""
    configured = request.app[CONFIG].public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"
