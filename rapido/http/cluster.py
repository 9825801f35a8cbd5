"""``GET /api/cluster``: this node, the members it sees, and the cluster's state; and
the short form ``/ready`` carries."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from rapido.cluster.service import Cluster
from rapido.cluster.tags import NodeTags, Peer
from rapido.http.errors import ApiError, json_response, read_json
from rapido.http.keys import CLUSTER, ENGINE, RELEASE, ROUTER, SETTINGS, base_url
from rapido.http.rollout import health_json, rollout_json
from rapido.http.routing import Router, claims_answer, parse_claims

routes = web.RouteTableDef()


def _local(request: web.Request) -> NodeTags:
    """A single node's own entry, from its engine (a clustered one publishes it)."""
    cluster = request.app.get(CLUSTER)
    if cluster is not None and cluster.node_id:
        return cluster.local_tags()
    engine = request.app[ENGINE]
    settings = request.app[SETTINGS]
    capacity = engine.settings.max_streams
    return NodeTags(node_id=engine.node_id, url=base_url(request), region=settings.region,
                    location=None, version=settings.node_version, capacity=capacity,
                    free_slots=max(0, capacity - len(engine.sessions)),
                    load=engine.load, draining=engine.draining)


def _tags_json(t: NodeTags, state: str) -> dict[str, Any]:
    return {"node_id": t.node_id, "state": state, "region": t.region, "version": t.version,
            "load": round(t.load, 3), "capacity": t.capacity, "free_slots": t.free_slots,
            "draining": t.draining, "url": t.url}


def _peer_json(p: Peer) -> dict[str, Any]:
    v = p.view
    return {"node_id": v.node_id, "state": v.status, "region": v.region,
            "version": v.version, "load": v.load, "capacity": v.capacity,
            "free_slots": v.free_slots, "draining": v.draining, "url": p.url,
            "streams": p.streams, "memory": p.memory, "gpu_memory": p.gpu_memory,
            "health": health_json(p.health), "rollout_epoch": p.rollout_epoch}


def cluster_summary(cluster: Cluster | None) -> dict[str, Any]:
    """What ``/ready`` says of the cluster."""
    if cluster is None:
        return {"cluster": "single"}
    out: dict[str, Any] = {"cluster": cluster.state,
                           "cluster_members": sum(p.view.status == "alive"
                                                  for p in cluster.view())}
    if cluster.error is not None:
        out["cluster_error"] = cluster.error
    return out


@routes.get("/api/cluster")
async def cluster_state(request: web.Request) -> web.Response:
    cluster = request.app.get(CLUSTER)
    me = _tags_json(_local(request), "alive")
    if cluster is None:
        return json_response({"node": me, "members": [me], "cluster": "single"})
    body: dict[str, Any] = {"node": me, "members": [_peer_json(p) for p in cluster.view()],
                            "cluster": cluster.state}
    router = request.app.get(ROUTER)
    if router is not None:
        body["routing"] = {"records": len(router.directory), "queries": router.queries,
                           "moved": router.moved}
    body["rollout"] = rollout_json(request.app.get(RELEASE))
    if cluster.error is not None:
        body["error"] = cluster.error
    return json_response(body)


def _router(request: web.Request) -> Router:
    router = request.app.get(ROUTER)
    if router is None:
        raise ApiError(404, "not_clustered", "this node is not part of a cluster")
    return router


@routes.post("/api/cluster/claims")
async def take_claims(request: web.Request) -> web.Response:
    """From another node: the sessions it plays of lessons this node is home of. The
    answer names those of them that lost to another session of their lesson (the
    claimant closes them with reason ``moved``)."""
    router = _router(request)
    node, claims, lessons = parse_claims(await read_json(request))
    return claims_answer(await router.take_claims(node, claims, lessons))


@routes.post("/api/cluster/moved")
async def moved(request: web.Request) -> web.Response:
    """From a lesson's home: these sessions of this node lost their lesson to another
    session; they close with reason ``moved``."""
    router = _router(request)
    data = await read_json(request)
    ids = data.get("session_ids") if isinstance(data, dict) else None
    if (not isinstance(ids, list) or len(ids) > 10_000
            or not all(isinstance(i, str) for i in ids)):
        raise ApiError(400, "invalid_session_ids", 'the body is {"session_ids": [id, ...]}')
    return json_response({"closed": await router.move(ids)})
