"""``POST /api/admin/drain``: drain this node over the API, as SIGTERM does.

Behind the API key like every ``/api`` call (a keyless node, on loopback, takes it as it
takes the others: from this machine, with the Host and Origin checks of ``auth.py``).
The node stops admitting at once (``/ready`` 503, creates 503 ``draining``; in a cluster
its tags say ``draining`` within the gossip's delay), lets speech in flight play out for
up to ``drain_timeout_s``, closes what is left (``moved`` in a cluster, so clients
reconnect through any node), leaves the cluster and exits 0. Answered 202 at once; a
second call answers the same.
"""

from __future__ import annotations

from aiohttp import web

from rapido.http.errors import ApiError, json_response
from rapido.http.keys import DRAIN

routes = web.RouteTableDef()


@routes.post("/api/admin/drain")
async def drain(request: web.Request) -> web.Response:
    control = request.app.get(DRAIN)
    if control is None:
        raise ApiError(501, "not_supported", "this server cannot be drained over HTTP; "
                       "stop it with SIGTERM")
    control.start()
    return json_response({"draining": True, "drain_timeout_s": control.timeout_s},
                         status=202)
