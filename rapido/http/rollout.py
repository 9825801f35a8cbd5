"""The rollout over the API (behind the API key, like every ``/api`` call):

* ``GET /api/admin/rollout``: the cluster's rollout as this node holds it (its state,
  percent and phase now), the versions the members run, the rollout events this node
  took (by op);
* ``POST /api/admin/rollout`` ``{"version": V, "phases": [{"percent", "duration_s"},
  ...]}`` on any node of a cluster: starts it (202; a Serf user event, every node holds
  it within the gossip's delay; a rollout already running is replaced);
* ``POST /api/admin/rollout/abort``: ends the running one (0 %);
* ``POST /api/admin/health/drill`` (only with ``health_drills`` on): made-up figures
  added to this node's health window, to rehearse an automatic rollback;
  ``DELETE`` clears them.

A bad body is a 400 naming the field and changes nothing.
"""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web

from rapido.cluster.health import Health
from rapido.cluster.release import Release
from rapido.cluster.rollout import PlanError, RolloutState, parse_plan
from rapido.cluster.serf import SerfError
from rapido.http.errors import ApiError, json_response, read_json
from rapido.http.keys import HEALTH, RELEASE, SETTINGS

routes = web.RouteTableDef()


def rollout_json(release: Release | None) -> dict[str, Any]:
    """The rollout as ``/api/cluster`` and ``/api/admin/rollout`` show it."""
    if release is None:
        return RolloutState().to_json(time.time())
    return release.to_json()


def _release(request: web.Request) -> Release:
    release = request.app.get(RELEASE)
    if release is None:
        raise ApiError(404, "not_clustered", "this node is not part of a cluster: a rollout "
                       "splits new sessions between nodes of two versions")
    return release


@routes.get("/api/admin/rollout")
async def show(request: web.Request) -> web.Response:
    release = request.app.get(RELEASE)
    body: dict[str, Any] = {"rollout": rollout_json(release),
                            "node_version": request.app[SETTINGS].node_version}
    if release is not None:
        body["versions"] = sorted(release.versions())
        body["events"] = dict(release.events)
    return json_response(body)


@routes.post("/api/admin/rollout")
async def start(request: web.Request) -> web.Response:
    release = _release(request)
    data = await read_json(request)
    try:
        version, phases = parse_plan(data, release.versions())
    except PlanError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    try:
        await release.start_rollout(version, phases)
    except (SerfError, ValueError) as exc:
        raise ApiError(503, "cluster_unavailable", f"the rollout could not be sent to the "
                       f"cluster: {exc}", headers={"Retry-After": "2"}) from None
    return json_response({"rollout": release.to_json()}, status=202)


@routes.post("/api/admin/rollout/abort")
async def abort(request: web.Request) -> web.Response:
    release = _release(request)
    try:
        state = await release.abort()
    except (SerfError, ValueError) as exc:
        raise ApiError(503, "cluster_unavailable", f"the abort could not be sent to the "
                       f"cluster: {exc}", headers={"Retry-After": "2"}) from None
    if state is None:
        raise ApiError(409, "no_rollout", "no rollout is running")
    return json_response({"rollout": release.to_json()})


_DRILL = ("ended", "errors", "underruns", "gpu_memory_errors", "frames", "latency_ms")


def parse_drill(data: Any) -> tuple[Health, float | None]:
    """The drill's body: counts (whole numbers 0..1e6, errors <= ended) and, with
    ``frames``, how late they were (``latency_ms``, 0..60000)."""
    if not isinstance(data, dict) or not data or set(data) - set(_DRILL):
        raise ApiError(400, "invalid_drill", f"the body is an object of {', '.join(_DRILL)}")
    counts: dict[str, int] = {}
    for key in _DRILL[:-1]:
        v = data.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1_000_000:
            raise ApiError(400, "invalid_drill", f"{key} must be a whole number within "
                           f"0..1000000, got {v!r}")
        counts[key] = v
    latency = data.get("latency_ms")
    if counts["frames"]:
        if (isinstance(latency, bool) or not isinstance(latency, int | float)
                or not math.isfinite(latency) or not 0 <= latency <= 60_000):
            raise ApiError(400, "invalid_drill", "frames need latency_ms within 0..60000")
    elif latency is not None:
        raise ApiError(400, "invalid_drill", "latency_ms goes with frames")
    if counts["errors"] > counts["ended"]:
        raise ApiError(400, "invalid_drill", "errors cannot exceed ended")
    figures = Health(ended=counts["ended"], errors=counts["errors"],
                     underruns=counts["underruns"],
                     gpu_memory_errors=counts["gpu_memory_errors"], frames=counts["frames"])
    return figures, None if latency is None else float(latency) / 1000.0


def _window(request: web.Request) -> Any:
    window = request.app.get(HEALTH)
    if window is None:
        raise ApiError(404, "drills_disabled", "health drills are off on this node "
                       "(health_drills)")
    return window


@routes.post("/api/admin/health/drill")
async def drill(request: web.Request) -> web.Response:
    window = _window(request)
    figures, latency_s = parse_drill(await read_json(request))
    now = time.monotonic()
    window.drill(now, figures, latency_s)
    return json_response({"health": health_json(window.figures(now))})


@routes.delete("/api/admin/health/drill")
async def clear_drill(request: web.Request) -> web.Response:
    window = _window(request)
    window.clear_drills()
    return json_response({"health": health_json(window.figures(time.monotonic()))})


def health_json(h: Health) -> dict[str, Any]:
    return {"ended": h.ended, "errors": h.errors, "underruns": h.underruns,
            "gpu_memory_errors": h.gpu_memory_errors, "frames": h.frames,
            "p95_frame_latency_ms": None if h.p95_ms is None else round(h.p95_ms, 1)}
