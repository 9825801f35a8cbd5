"""Which node serves a lesson, seen from the HTTP edge of a clustered node.

Creating a session (``POST /api/sessions``) on any node:

1. The node that got the request (the *front*) answers from its own engine when the
   lesson plays there. Otherwise it picks the lesson's region (the user's, or its own)
   and forwards the request to the lesson's **home**
   (:func:`~rapido.cluster.placement.home_order`: rendezvous over the alive,
   non-draining members), the first of the homes that answers; it may be the front.
2. The home decides (``X-Rapido-Route: home``): the lesson's record in its
   :class:`~rapido.cluster.directory.Directory` names where it plays (or played within
   the hour), and the request goes there first; with no record, only when the
   membership changed within the hour does it ask the cluster (a Serf query, at most
   ``query_timeout_s``) who plays or played it. Then :func:`~rapido.cluster.placement.place`
   (bounded loads, affinity) ranks the candidates, and the request goes to the first
   that takes it (``X-Rapido-Route: here``: create it there, no further routing). The
   home records the session it got back.
3. A node asked ``here`` creates the session itself (or returns its live one).

So a request is forwarded at most twice, and every node, from the same view, ends at
the same home and so at the same session. The front keeps the client's ``Host``: the
URLs in the session JSON name the node the client asked.

Every node also *claims* its live sessions with their homes whenever its view of the
alive members changes and every ``reclaim_s``: a home new to a lesson learns of it
without a query, and two sessions of one lesson (after a partition) meet at one home,
which keeps the winner of :func:`~rapido.cluster.placement.resolve_double` and has the
loser closed with reason ``moved``.

:meth:`Router.locate` routes a session's own URLs: the node is in the session id.

Why one module over 500 lines: creating, forwarding, claiming and resolving doubles
are one protocol between nodes, each step reading the others' headers and records; split,
the halves of each exchange would sit in different files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from rapido.aio import cancel_and_wait
from rapido.cluster.directory import Directory
from rapido.cluster.placement import (
    AFFINITY_TTL_S,
    MOVED,
    Affinity,
    Claim,
    MemberView,
    choose_region,
    home_moved,
    home_order,
    place,
    rank,
    resolve_double,
    session_node,
    should_query,
)
from rapido.cluster.release import Release
from rapido.cluster.serf import SerfError
from rapido.cluster.service import Cluster
from rapido.cluster.tags import Peer
from rapido.engine import Engine
from rapido.http.errors import ApiError, json_response
from rapido.http.forwarded import HOP_HEADER, forwarded_host, forwarded_proto
from rapido.http.locate import Lost, Remote, Where
from rapido.pipeline.session import SessionSpec, StreamSession

log = logging.getLogger(__name__)

ROUTE_HEADER: Final = "X-Rapido-Route"
REGION_HEADER: Final = "X-Rapido-Region"
#: The Serf query: who plays (or played within the hour) this lesson?
LESSON_QUERY: Final = "rapido-lesson"
#: Headers of the client's create request that travel with it (not Origin: this node
#: checked it against itself; a keyless owner would refuse one that is not its own).
_PASSED: Final = ("Authorization", "Content-Type", "User-Agent", "X-Request-Id")
#: Headers of the answer that travel back.
_RETURNED: Final = ("Content-Type", "Location", "Retry-After")
#: How many candidates a front (homes) and a home (nodes to play on) try.
TRIES: Final = 3


@dataclass(frozen=True)
class RouterSettings:
    api_key: str
    epsilon: float
    query_timeout_s: float
    reclaim_s: float
    connect_timeout_s: float = 2.0


LocalCreate = Callable[[], Awaitable[web.Response]]


class Router:
    def __init__(self, settings: RouterSettings, engine: Engine, cluster: Cluster,
                 affinity: Affinity, release: Release | None = None) -> None:
        self.settings = settings
        self.release = release
        self.engine = engine
        self.cluster = cluster
        self.affinity = affinity
        self.directory = Directory(ttl_s=affinity.ttl_s)
        self.queries = 0  # Serf queries asked (a create should seldom need one)
        self.moved = 0  # sessions closed as the loser of a double
        self._regions: dict[str, str | None] = {}  # session id -> the region it was placed in
        self._http: aiohttp.ClientSession | None = None
        self._reclaim = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        cluster.respond_to(LESSON_QUERY, self.answer)
        cluster.on_change(self._reclaim.set)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30.0, connect=self.settings.connect_timeout_s)
        self._http = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                           cookie_jar=aiohttp.DummyCookieJar())
        self._task = asyncio.create_task(self._reclaim_loop(),
                                         name=f"router-claims {self.engine.node_id}")

    async def aclose(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- the view -----------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.engine.node_id

    def _view(self) -> list[MemberView]:
        return [p.view for p in self.cluster.view()]

    def _alive(self, node_id: str) -> Peer | None:
        peer = self.cluster.peer(node_id)
        return peer if peer is not None and peer.view.status == "alive" else None

    def locate(self, session_id: str) -> Where:
        node = session_node(session_id)
        if node is None or node == self.node_id:
            return None
        peer = self._alive(node)
        return Remote(node, peer.url) if peer is not None else Lost(node)

    # -- creating a session -------------------------------------------------------------

    async def create(self, request: web.Request, spec: SessionSpec, body: bytes,
                     local: LocalCreate) -> web.Response:
        """The answer to ``POST /api/sessions`` for ``spec`` (``body``: the request's
        JSON), from this node (``local()``) or the node the lesson is routed to."""
        route = request.headers.get(ROUTE_HEADER, "")
        lesson = spec.lesson_id
        if route == "here" or self.engine.find_lesson(lesson) is not None:
            return await self._here(request, local)
        view = self._view()
        if route == "home":
            region = request.headers.get(REGION_HEADER) or None
            return await self._decide(request, spec, body, local, view, region)
        try:
            region = choose_region(view, spec.user_location, self.cluster.settings.region)
        except ValueError as exc:  # checked at the edge already; a view gone bad
            raise ApiError(400, "invalid_user_location", str(exc)) from None
        homes = home_order(lesson, view, region)
        if not homes:  # alone and draining, or no view yet: as a single node would
            return await self._here(request, local, region)
        for home in homes[:TRIES]:
            if home.node_id == self.node_id:
                return await self._decide(request, spec, body, local, view, region)
            answer = await self._forward(home.node_id, request, body, "home", region)
            if answer is not None:
                return answer
        raise _unavailable(f"no home of lesson {lesson!r} answered")

    async def _here(self, request: web.Request, local: LocalCreate,
                    region: str | None = None) -> web.Response:
        try:
            answer = await local()
        except ApiError as exc:  # a refusal: the home tries the next node on a 503
            answer = exc.response()
        if answer.status in (200, 201):
            session = self.engine.find_lesson(_lesson_of(answer))
            if session is not None and session.id not in self._regions:
                self._regions[session.id] = (request.headers.get(REGION_HEADER) or region
                                             or self.cluster.settings.region)
        return answer

    async def _decide(self, request: web.Request, spec: SessionSpec, body: bytes,
                      local: LocalCreate, view: list[MemberView],
                      region: str | None) -> web.Response:
        """This node is the lesson's home: find or choose where it plays."""
        lesson = spec.lesson_id
        now = time.monotonic()
        first: str | None = None  # where the record says it plays (or played)
        sticky: str | None = None
        record = self.directory.lookup(lesson, now)
        if record is not None and self._alive(record.claim.node_id) is not None:
            first = record.claim.node_id
        elif record is None and self.affinity.holds(lesson, now):
            sticky = self.node_id
        elif record is None and self._must_ask(lesson, region, now):
            first, sticky = await self._ask(lesson)
        view = self._versioned(view, spec)
        try:
            placement = place(lesson, view, user_location=spec.user_location,
                              self_region=region, epsilon=self.settings.epsilon,
                              sticky=sticky or first)
        except ValueError as exc:
            raise ApiError(400, "invalid_user_location", str(exc)) from None
        ranked = [m.node_id for m in placement.ranked] if placement is not None else []
        # Past the region's own nodes (their free slots in the view may be seconds old),
        # any other eligible node: a lesson served from afar beats a refusal.
        ranked += [m.node_id for m in rank(lesson, view, epsilon=self.settings.epsilon)
                   if m.node_id not in ranked]
        if first is not None:  # a live session needs no free slot: ask its node first
            ranked = [first, *(n for n in ranked if n != first)]
        if not ranked:
            raise _unavailable("every node is full or draining")
        last: web.Response | None = None
        for node in ranked[:TRIES]:
            answer: web.Response | None
            if node == self.node_id:
                answer = await self._here(request, local, region)
            else:
                answer = await self._forward(node, request, body, "here", region)
            if answer is None:
                continue
            if answer.status in (200, 201):
                self._record(lesson, answer, now)
                return answer
            if answer.status != 503:  # a refusal for the request itself, not the node
                return answer
            last = answer
        if last is not None:
            return last
        raise _unavailable(f"no node could take lesson {lesson!r}")

    def _versioned(self, view: list[MemberView], spec: SessionSpec) -> list[MemberView]:
        """During a rollout, the members of the version this user's bucket gets (the
        rollout's, or any other); every member when none of them can take a session: a
        lesson served on the other version beats a refusal."""
        if self.release is None:
            return view
        choice = self.release.new_version_for(spec.user_id or spec.lesson_id)
        if choice is None:
            return view
        version, new = choice
        pool = [m for m in view if (m.version == version) == new]
        if any(m.eligible for m in pool):
            return pool
        log.warning("lesson %s: no node of %s version %s can take it; placing it on any",
                    spec.lesson_id, "the rollout's" if new else "a version other than",
                    version)
        return view

    def _must_ask(self, lesson: str, region: str | None, now: float) -> bool:
        """No record here: ask the cluster only when the membership changed within the
        hour (``should_query``) and either this node joined within it (it knows nothing
        older) or, in a view of that hour, the lesson's home was another node."""
        if not should_query(lesson, self.cluster.view_changed_at, now, has_record=False):
            return False
        started = self.cluster.started_at
        if started is None or now - started < AFFINITY_TTL_S:
            return True
        return home_moved(lesson, (v for _, v in self.cluster.history), region,
                          self.node_id)

    def _record(self, lesson: str, answer: web.Response, now: float) -> None:
        try:
            data = orjson.loads(_body(answer))
            claim = Claim(str(data["node"]), str(data["session_id"]),
                          _epoch(data.get("created_at")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("lesson %s: the session answer could not be recorded: %s", lesson,
                        exc)
            return
        self.directory.record(lesson, claim, now)

    async def _ask(self, lesson: str) -> tuple[str | None, str | None]:
        """Who plays ``lesson`` now (first), or played it within the hour (sticky)."""
        self.queries += 1
        try:
            answers = await self.cluster.ask(LESSON_QUERY, lesson.encode(),
                                             self.settings.query_timeout_s)
        except (SerfError, ValueError) as exc:
            log.warning("lesson %s: asking the cluster failed: %s", lesson, exc)
            return None, None
        live: list[Claim] = []
        ended: list[str] = []
        for a in answers:
            try:
                data = orjson.loads(a.payload)
                node = str(data["node"])
                if self._alive(node) is None:
                    continue
                if data.get("session_id"):
                    live.append(Claim(node, str(data["session_id"]),
                                      float(data["created_at"])))
                else:
                    ended.append(node)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("lesson %s: a malformed answer from %s", lesson, a.from_node)
        if live:
            winner = live[0]
            for other in live[1:]:
                res = resolve_double(lesson, winner, other, self._view())
                await self._move(res.loser)
                winner = res.winner
            self.directory.record(lesson, winner, time.monotonic())
            return winner.node_id, None
        return None, min(ended) if ended else None

    def answer(self, payload: bytes) -> bytes | None:
        """The query ``rapido-lesson``: does this node play the lesson, or did it within
        the hour? Silent when not (the asker waits out the timeout anyway)."""
        try:
            lesson = payload.decode()
        except UnicodeDecodeError:
            return None
        session = self.engine.find_lesson(lesson)
        if session is not None:
            return orjson.dumps({"node": self.node_id, "session_id": session.id,
                                 "created_at": session.created_at})
        if lesson and self.affinity.holds(lesson, time.monotonic()):
            return orjson.dumps({"node": self.node_id, "session_id": None})
        return None

    # -- talking to other nodes ---------------------------------------------------------

    async def _forward(self, node: str, request: web.Request, body: bytes, route: str,
                       region: str | None) -> web.Response | None:
        """``POST /api/sessions`` on ``node``; its answer, or ``None`` when it cannot be
        reached (the caller tries the next)."""
        peer = self._alive(node)
        if peer is None or self._http is None:
            return None
        hop = _hop(request) + 1
        if hop > 2:
            raise ApiError(508, "loop_detected", "this create was forwarded twice already; "
                           "the nodes' views disagree, retry in a moment")
        headers = {k: v for k in _PASSED if (v := request.headers.get(k)) is not None}
        headers.update({"X-Forwarded-Host": forwarded_host(request),
                        "X-Forwarded-Proto": forwarded_proto(request),
                        ROUTE_HEADER: route, HOP_HEADER: str(hop), REGION_HEADER: region or ""})
        try:
            async with self._http.post(f"{peer.url}/api/sessions", data=body,
                                       headers=headers) as r:
                data = await r.read()
                out = {k: v for k in _RETURNED if (v := r.headers.get(k)) is not None}
                return web.Response(status=r.status, body=data, headers=out)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("forwarding a create to %s failed: %s", node, exc)
            return None

    def _auth(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _post(self, node: str, path: str, data: Mapping[str, Any]) -> Any:
        peer = self._alive(node)
        if peer is None or self._http is None:
            return None
        try:
            async with self._http.post(f"{peer.url}{path}", data=orjson.dumps(data),
                                       headers={**self._auth(),
                                                "Content-Type": "application/json"}) as r:
                if r.status != 200:
                    log.warning("%s on %s answered %d", path, node, r.status)
                    return None
                return orjson.loads(await r.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.warning("%s on %s failed: %s", path, node, exc)
            return None

    async def _plays(self, claim: Claim) -> bool:
        """Whether ``claim``'s session still plays on its node."""
        if claim.node_id == self.node_id:
            return claim.session_id in self.engine.sessions
        peer = self._alive(claim.node_id)
        if peer is None or self._http is None:
            return False
        try:
            async with self._http.get(f"{peer.url}/api/sessions/{claim.session_id}",
                                      headers=self._auth()) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _move(self, loser: Claim) -> None:
        """Have the loser of a double close its session with reason ``moved``."""
        self.moved += 1
        log.warning("session %s on %s loses its lesson to another session: moved",
                    loser.session_id, loser.node_id)
        if loser.node_id == self.node_id:
            await self.engine.close_session(loser.session_id, MOVED)
        else:
            await self._post(loser.node_id, "/api/cluster/moved",
                             {"session_ids": [loser.session_id]})

    # -- claims ---------------------------------------------------------------------------

    async def take_claims(self, node: str, claims: list[Claim], lessons: list[str]) -> list[str]:
        """Claims from ``node`` (its live sessions of ``lessons``), this node their home:
        recorded; a double is resolved. The claimant's session ids that lost."""
        now = time.monotonic()
        lost: list[str] = []
        for lesson, claim in zip(lessons, claims, strict=True):
            old = self.directory.record(lesson, claim, now)
            if old is None or not await self._plays(old.claim):
                continue
            res = resolve_double(lesson, old.claim, claim, self._view())
            self.directory.record(lesson, res.winner, now)
            if res.loser.node_id == node:
                self.moved += 1
                lost.append(res.loser.session_id)
            else:
                await self._move(res.loser)
        return lost

    async def move(self, session_ids: list[str]) -> int:
        """Close these sessions of this node with reason ``moved``; how many were."""
        n = 0
        for sid in session_ids:
            if await self.engine.close_session(sid, MOVED):
                n += 1
        return n

    async def _reclaim_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.reclaim_s):
                    await self._reclaim.wait()
            await asyncio.sleep(1.0)  # let a burst of member changes settle
            self._reclaim.clear()
            try:
                await self.claim_all()
            except Exception:
                log.exception("claiming this node's lessons with their homes failed")

    async def claim_all(self) -> None:
        """Tell each live session's home that it plays here."""
        sessions = list(self.engine.sessions.values())
        self._regions = {sid: r for sid, r in self._regions.items()
                         if sid in self.engine.sessions}
        view = self._view()
        by_home: dict[str, list[StreamSession]] = {}
        for s in sessions:
            homes = home_order(s.lesson_id, view, self._regions.get(s.id))
            if homes:
                by_home.setdefault(homes[0].node_id, []).append(s)
        for home, group in by_home.items():
            claims = [Claim(self.node_id, s.id, s.created_at) for s in group]
            lessons = [s.lesson_id for s in group]
            if home == self.node_id:
                lost = await self.take_claims(self.node_id, claims, lessons)
            else:
                answer = await self._post(home, "/api/cluster/claims", {
                    "node": self.node_id,
                    "claims": [{"lesson_id": lesson, "session_id": c.session_id,
                                "created_at": c.created_at}
                               for lesson, c in zip(lessons, claims, strict=True)]})
                lost = _strings(answer.get("moved")) if isinstance(answer, dict) else []
            for sid in lost:
                if sid in self.engine.sessions:
                    await self.engine.close_session(sid, MOVED)


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "no_node_available", message, headers={"Retry-After": "2"})


def _hop(request: web.Request) -> int:
    try:
        return max(0, int(request.headers.get(HOP_HEADER, "0")))
    except ValueError:
        return 0


def _body(answer: web.Response) -> bytes:
    body = answer.body
    return bytes(body) if isinstance(body, bytes | bytearray | memoryview) else b""


def _lesson_of(answer: web.Response) -> str:
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
        return str(orjson.loads(_body(answer)).get("lesson_id", ""))
    return ""


def _epoch(value: Any) -> float:
    """The session JSON's ``created_at`` (ISO 8601, UTC, milliseconds) as epoch s."""
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"created_at is not a time: {value!r}")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def parse_claims(data: Any) -> tuple[str, list[Claim], list[str]]:
    """``POST /api/cluster/claims``'s body: ``{"node", "claims": [{"lesson_id",
    "session_id", "created_at"}]}``; ApiError 400 naming the field otherwise."""
    if not isinstance(data, dict) or set(data) != {"node", "claims"}:
        raise ApiError(400, "invalid_claims", 'the body is {"node": id, "claims": [...]}')
    node, raw = data["node"], data["claims"]
    if not isinstance(raw, list) or len(raw) > 10_000:
        raise ApiError(400, "invalid_claims", "claims is a list of at most 10000")
    claims: list[Claim] = []
    lessons: list[str] = []
    for i, c in enumerate(raw):
        try:
            if not isinstance(c, dict) or set(c) != {"lesson_id", "session_id", "created_at"}:
                raise ValueError("a claim is {lesson_id, session_id, created_at}")
            lesson = c["lesson_id"]
            if not isinstance(lesson, str) or not lesson or len(lesson) > 64:
                raise ValueError("lesson_id must be a string of 1-64 characters")
            claim = Claim(node, c["session_id"], c["created_at"])
            if session_node(claim.session_id) != node:
                raise ValueError("session_id must be one of the claiming node's")
        except ValueError as exc:
            raise ApiError(400, "invalid_claims", f"claims[{i}]: {exc}") from None
        claims.append(claim)
        lessons.append(lesson)
    return node, claims, lessons


def claims_answer(moved: list[str]) -> web.Response:
    return json_response({"moved": moved})
