"""What a request forwarded by another node of the cluster says of the client's own.

Only a request marked with :data:`HOP_HEADER` is read this way (one that is not keeps its
own Host and scheme): the URLs in an answer then lead back through the node the client
chose. Forgeable like any header, so nothing here grants access: the Host check of a
keyless node and the API key are applied to the request as it arrived.
"""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

#: Set on a request another node of the cluster forwards: how many times it was.
HOP_HEADER: Final = "X-Rapido-Hop"
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?"
                   r"|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")


def forwarded_host(request: web.Request) -> str:
    """The host the client asked: the request's own, or on a forwarded request the one
    the forwarding node was asked (``X-Forwarded-Host``)."""
    if HOP_HEADER in request.headers:
        host = request.headers.get("X-Forwarded-Host", "")
        if _HOST.fullmatch(host):
            return host
    return request.host


def forwarded_proto(request: web.Request) -> str:
    """``http`` or ``https`` as the client used it (``X-Forwarded-Proto`` likewise)."""
    if HOP_HEADER in request.headers:
        proto = request.headers.get("X-Forwarded-Proto", "")
        if proto in ("http", "https"):
            return proto
    return request.scheme
