"""A LiveKit SFU stand-in on loopback, for end-to-end tests of the real ``livekit`` SDK.

No LiveKit server can be installed here, so this speaks the server's side of LiveKit's
client signalling (protocol 18, as ``livekit`` 1.2.x talks it) with the protobufs of
``livekit-protocol``, and terminates the publisher peer connections with aiortc:

* WebSocket ``/rtc/v1?join_request=...`` (the SDK's default: the join request, carrying
  the client's first offer, as url-safe base64 of a ``WrappedJoinRequest``, maybe
  gzipped) and ``/rtc`` (the SDK's fallback when ``/rtc/v1`` answers 404; ``v1=False``
  makes it so). ``/rtc[/v1]/validate`` says why a join was refused.
* The access token (``Authorization: Bearer``) is verified with ``livekit-api``'s
  ``TokenVerifier``: signature, expiry, a ``roomJoin`` grant, and the room, when the
  stand-in is told which rooms exist. A participant whose token cannot subscribe and
  who asks to (auto-subscribe) is refused that, and it is recorded.
* Join, offer/answer (the answer carries aiortc's candidates; the client's are trickled
  in), track publication (``AddTrackRequest`` -> ``TrackPublishedResponse``), ping/pong,
  leave; participants are announced to each other with their kind and attributes.
* Data packets (user packets, RPC, byte streams) arriving on a participant's data
  channels are relayed to the other participants of its room on theirs.
* What arrives is decoded and recorded per participant: each picture and each piece of
  sound with its RTP timestamp and arrival time, and the RTCP sender reports that place
  both RTP clocks on the sender's own (NTP) clock.
* It can be stopped for a while (every connection dropped, the port closed) and
  restarted on the same port, and told to refuse joins.

Not covered: forwarding media to subscribers (no subscriber peer connection is ever
offered), simulcast layer selection, TURN, region routing, congestion control (it
reports an ample link, see ``REMB_BPS``), session resumption (a client that tries to
resume is told to rejoin). While it runs, aiortc's video header extensions (a global)
include the RID extensions; ``aclose`` restores them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import av
import numpy as np
from aiohttp import WSMsgType, web
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpHeaderExtensionParameters,
    RTCSessionDescription,
)
from aiortc.codecs import HEADER_EXTENSIONS
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import RtcpSrPacket, RTCRtpReceiver
from aiortc.sdp import candidate_from_sdp
from livekit import api
from livekit.api.access_token import Claims
from livekit.protocol import models, rtc

from rapido.aio import cancel_and_wait
from rapido.bench.viewer import rtp_timestamp

log = logging.getLogger(__name__)

#: Picture keeper: from a decoded picture (luma, full size), what to keep of it (e.g. the
#: mouth region), or None to keep nothing but its size.
Keep = Callable[[np.ndarray], np.ndarray | None]

#: aiortc does not offer the RID header extensions; without them in its answer,
#: libwebrtc rejects its own next offer under simulcast and no media flows.
RID_EXTENSIONS = ("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
                  "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id")

#: The receiver's bandwidth estimate the stand-in reports (REMB), in bits/s. aiortc's own
#: estimator never lets it above 1.5x what arrives (AIMD on the incoming rate), and
#: libwebrtc, with no other feedback (aiortc has no transport-cc), then reads the loopback
#: as a ~125 kbps link and scales the video down: 854x480 arrived as 636x360. The
#: stand-in models a network that is not the bottleneck.
REMB_BPS = 20_000_000


class _AmpleLink:
    """Stands in for aiortc's ``RemoteBitrateEstimator``: reports ``REMB_BPS`` for every
    stream, at most every 250 ms."""

    def __init__(self) -> None:
        self._last_ms = -1_000_000

    def add(self, arrival_time_ms: int, abs_send_time: int, payload_size: int, ssrc: int
            ) -> tuple[int, list[int]] | None:
        if arrival_time_ms - self._last_ms < 250:
            return None
        self._last_ms = arrival_time_ms
        return REMB_BPS, [ssrc]


class Refused(Exception):
    """A join refused: HTTP status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _ntp_s(ntp: int) -> float:
    return (ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32


def _signed32(d: int) -> int:
    d &= 0xFFFFFFFF
    return d - (1 << 32) if d >= 1 << 31 else d


@dataclass
class Picture:
    at: float  # arrival (decoded), time.monotonic()
    rtp: int  # RTP timestamp, 90 kHz
    width: int
    height: int
    kept: np.ndarray | None  # what the keeper kept of its luma


@dataclass
class Sound:
    at: float
    rtp: int  # RTP timestamp at the sample rate
    rate: int
    samples: np.ndarray  # mono int16


@dataclass
class Report:
    at: float  # arrival, time.monotonic()
    ntp_s: float  # the sender's clock
    rtp: int


@dataclass
class Media:
    """What one participant's publisher connection delivered, decoded."""

    pictures: list[Picture] = field(default_factory=list)
    sounds: list[Sound] = field(default_factory=list)
    reports: dict[str, list[Report]] = field(default_factory=dict)  # kind -> sender reports

    def sender_time(self, kind: str, rtp: int, clock: int) -> float:
        """Where the sender's reports put RTP time ``rtp`` on its clock (median over
        reports, as a receiver's A/V sync does with the latest)."""
        reports = self.reports.get(kind, [])
        if not reports:
            raise ValueError(f"no sender report for {kind}")
        return float(np.median([r.ntp_s + _signed32(rtp - r.rtp) / clock for r in reports]))

    def clock_offset(self, kind: str) -> float:
        """Arrival minus sender clock, median over this kind's sender reports."""
        return float(np.median([r.at - r.ntp_s for r in self.reports.get(kind, [])]))


@dataclass
class Participant:
    sid: str
    identity: str
    room: str
    claims: Claims
    path: str  # "/rtc/v1" or "/rtc"
    kind: int
    attributes: dict[str, str]
    ws: web.WebSocketResponse
    pc: RTCPeerConnection
    wants_subscribe: bool = False
    subscribe_refused: bool = False
    tracks: list[models.TrackInfo] = field(default_factory=list)
    add_track_requests: list[rtc.AddTrackRequest] = field(default_factory=list)
    channels: dict[str, RTCDataChannel] = field(default_factory=dict)  # label -> channel
    media: Media = field(default_factory=Media)
    data_in: int = 0  # data packets received
    offers: int = 0
    pings: int = 0
    left: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def info(self) -> models.ParticipantInfo:
        g = self.claims.video
        return models.ParticipantInfo(
            sid=self.sid, identity=self.identity, name=self.claims.name or "",
            state=(models.ParticipantInfo.DISCONNECTED if self.left
                   else models.ParticipantInfo.ACTIVE),
            tracks=self.tracks, joined_at=int(time.time()), kind=self.kind,  # type: ignore[arg-type]
            attributes=self.attributes, is_publisher=bool(self.tracks),
            permission=models.ParticipantPermission(
                can_subscribe=bool(g and g.can_subscribe),
                can_publish=bool(g and g.can_publish),
                can_publish_data=bool(g and g.can_publish_data),
                hidden=bool(g and g.hidden)))


@dataclass
class Rejection:
    path: str
    status: int
    reason: str


class StandIn:
    """The stand-in server (see the module docstring). ``rooms``: the rooms that exist
    (None: any room a valid token names)."""

    def __init__(self, api_key: str, api_secret: str, *, rooms: set[str] | None = None,
                 keep: Keep | None = None, v1: bool = True) -> None:
        self.verifier = api.TokenVerifier(api_key, api_secret)
        self.rooms = rooms
        self.keep = keep
        self.v1 = v1  # False: /rtc/v1 answers 404 and the SDK falls back to /rtc
        self.refuse_joins: str | None = None  # a reason: every join is refused
        self.participants: list[Participant] = []  # everyone who ever joined
        self.rejections: list[Rejection] = []
        self.downtime: list[tuple[float, float]] = []  # (stopped, restarted) monotonic
        self._room_sids: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._saved_ext: list[RTCRtpHeaderExtensionParameters] | None = None
        self._ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}"

    async def start(self) -> None:
        if self._saved_ext is None:
            self._saved_ext = HEADER_EXTENSIONS["video"][:]
            used = {e.id for e in self._saved_ext}
            free = (i for i in range(1, 15) if i not in used)
            HEADER_EXTENSIONS["video"][:] = self._saved_ext + [
                RTCRtpHeaderExtensionParameters(id=next(free), uri=uri)
                for uri in RID_EXTENSIONS]
        app = web.Application()
        app.router.add_get("/rtc/v1", self._ws_v1)
        app.router.add_get("/rtc", self._ws_legacy)
        app.router.add_get("/rtc/validate", self._validate)
        app.router.add_get("/rtc/v1/validate", self._validate)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=True)
        await site.start()
        if not self._port:
            server = cast(asyncio.Server, site._server)
            self._port = int(server.sockets[0].getsockname()[1])
        self._runner = runner

    async def stop(self) -> None:
        """Drop every participant and close the port (``start`` opens it again)."""
        runner, self._runner = self._runner, None
        for p in self.live():
            await self._drop(p)
        if runner is not None:
            await runner.cleanup()

    async def outage(self, seconds: float) -> None:
        """Down for ``seconds``, then back on the same port."""
        t0 = time.monotonic()
        await self.stop()
        await asyncio.sleep(seconds)
        await self.start()
        self.downtime.append((t0, time.monotonic()))

    async def aclose(self) -> None:
        await self.stop()
        if self._saved_ext is not None:
            HEADER_EXTENSIONS["video"][:] = self._saved_ext
            self._saved_ext = None

    def live(self) -> list[Participant]:
        return [p for p in self.participants if not p.left]

    def find(self, identity: str) -> list[Participant]:
        """Every session of ``identity``, oldest first."""
        return [p for p in self.participants if p.identity == identity]

    # -- joining -----------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> Claims:
        if self.refuse_joins is not None:
            raise Refused(503, self.refuse_joins)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() or request.query.get("access_token", "")
        if not token:
            raise Refused(401, "no access token")
        try:
            claims = self.verifier.verify(token)
        except Exception as exc:
            raise Refused(401, f"invalid token: {type(exc).__name__}: {exc}") from exc
        g = claims.video
        if g is None or not g.room_join or not g.room:
            raise Refused(401, "the token grants no room join")
        if self.rooms is not None and g.room not in self.rooms:
            raise Refused(403, f"room {g.room} does not exist")
        if not claims.identity:
            raise Refused(401, "the token has no identity")
        return claims

    async def _validate(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
        except Refused as r:
            return web.Response(status=r.status, text=r.reason)
        return web.Response(text="success")

    async def _ws_v1(self, request: web.Request) -> web.StreamResponse:
        if not self.v1:
            return web.Response(status=404, text="404 page not found")
        raw = base64.urlsafe_b64decode(_pad(request.query.get("join_request", "")))
        wrapped = rtc.WrappedJoinRequest.FromString(raw)
        body = wrapped.join_request
        if wrapped.compression == rtc.WrappedJoinRequest.GZIP:
            body = gzip.decompress(body)
        join = rtc.JoinRequest.FromString(body)
        return await self._serve(request, "/rtc/v1", join)

    async def _ws_legacy(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        join = rtc.JoinRequest(
            connection_settings=rtc.ConnectionSettings(
                auto_subscribe=q.get("auto_subscribe", "1") in ("1", "true")),
            reconnect=q.get("reconnect", "0") in ("1", "true"),
            participant_sid=q.get("sid", ""))
        if "attributes" in q:
            with contextlib.suppress(Exception):
                join.participant_attributes.update(json.loads(
                    base64.urlsafe_b64decode(_pad(q["attributes"]))))
        return await self._serve(request, "/rtc", join)

    async def _serve(self, request: web.Request, path: str, join: rtc.JoinRequest
                     ) -> web.StreamResponse:
        try:
            claims = self._authorize(request)
            if join.reconnect:
                # No session survives here: make the client join afresh.
                raise Refused(404, "no session to resume: join again")
        except Refused as r:
            self.rejections.append(Rejection(path, r.status, r.reason))
            log.info("stand-in: refused a join on %s: %s", path, r.reason)
            return web.Response(status=r.status, text=r.reason)
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=0)
        await ws.prepare(request)
        g = claims.video
        assert g is not None and g.room is not None
        room = g.room
        attributes = dict(claims.attributes or {})
        attributes.update(join.participant_attributes)
        kind = {"agent": models.ParticipantInfo.AGENT, "sip": models.ParticipantInfo.SIP,
                "egress": models.ParticipantInfo.EGRESS,
                "ingress": models.ParticipantInfo.INGRESS}.get(
                    claims.kind or "", models.ParticipantInfo.STANDARD)
        for old in self.live():  # one identity per room: the newer session wins
            if old.room == room and old.identity == claims.identity:
                await self._drop(old, duplicate=True)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        p = Participant(sid=f"PA_{secrets.token_hex(6)}", identity=claims.identity,
                        room=room, claims=claims, path=path, kind=kind,
                        attributes=attributes, ws=ws, pc=pc,
                        wants_subscribe=join.connection_settings.auto_subscribe)
        if p.wants_subscribe and not g.can_subscribe:
            p.subscribe_refused = True
        self.participants.append(p)
        self._wire(p)
        others = [o for o in self.live() if o.room == room and o is not p]
        await self._send(p, rtc.SignalResponse(join=rtc.JoinResponse(
            room=models.Room(sid=self._room_sid(room), name=room,
                             num_participants=len(others) + 1,
                             creation_time=int(time.time())),
            participant=p.info(),
            other_participants=[o.info() for o in others if not _hidden(o)],
            server_version="1.9.0", server_region="loopback",
            subscriber_primary=False, ping_interval=5, ping_timeout=15,
            server_info=models.ServerInfo(version="1.9.0", protocol=16,
                                          region="loopback", node_id="standin"))))
        if not _hidden(p):
            await self._announce(p)
        if join.HasField("publisher_offer") and join.publisher_offer.sdp:
            await self._answer(p, join.publisher_offer)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                await self._on_request(p, rtc.SignalRequest.FromString(msg.data))
        except Exception:
            log.exception("stand-in: signalling of %s failed", p.identity)
        finally:
            if not p.left:
                await self._drop(p)
        return ws

    def _room_sid(self, room: str) -> str:
        return self._room_sids.setdefault(room, f"RM_{secrets.token_hex(6)}")

    # -- signalling --------------------------------------------------------------------

    async def _send(self, p: Participant, msg: rtc.SignalResponse) -> None:
        if p.ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await p.ws.send_bytes(msg.SerializeToString())

    async def _on_request(self, p: Participant, req: rtc.SignalRequest) -> None:
        which = req.WhichOneof("message")
        if which == "offer":
            await self._answer(p, req.offer)
        elif which == "trickle":
            await self._trickle(p, req.trickle)
        elif which == "add_track":
            await self._add_track(p, req.add_track)
        elif which == "ping_req":
            p.pings += 1
            await self._send(p, rtc.SignalResponse(pong_resp=rtc.Pong(
                last_ping_timestamp=req.ping_req.timestamp,
                timestamp=int(time.time() * 1000))))
        elif which == "ping":
            p.pings += 1
            await self._send(p, rtc.SignalResponse(pong=req.ping))
        elif which == "leave":
            await self._drop(p)
        elif which == "subscription":
            if not (p.claims.video and p.claims.video.can_subscribe):
                p.subscribe_refused = True
        else:
            log.debug("stand-in: %s sent %s (ignored)", p.identity, which)

    async def _answer(self, p: Participant, offer: rtc.SessionDescription) -> None:
        p.offers += 1
        await p.pc.setRemoteDescription(RTCSessionDescription(offer.sdp, "offer"))
        await p.pc.setLocalDescription(await p.pc.createAnswer())
        local = p.pc.localDescription
        await self._send(p, rtc.SignalResponse(answer=rtc.SessionDescription(
            type="answer", sdp=local.sdp, id=offer.id)))

    async def _trickle(self, p: Participant, t: rtc.TrickleRequest) -> None:
        if t.target != rtc.PUBLISHER or not t.candidateInit:
            return
        init = json.loads(t.candidateInit)
        sdp = str(init.get("candidate", ""))
        if not sdp:
            return
        cand = candidate_from_sdp(sdp.removeprefix("candidate:"))
        cand.sdpMid = init.get("sdpMid")
        cand.sdpMLineIndex = init.get("sdpMLineIndex")
        with contextlib.suppress(Exception):  # a candidate for an m-line not there yet
            await p.pc.addIceCandidate(cand)

    async def _add_track(self, p: Participant, req: rtc.AddTrackRequest) -> None:
        p.add_track_requests.append(req)
        g = p.claims.video
        if not (g and g.can_publish):
            await self._send(p, rtc.SignalResponse(request_response=rtc.RequestResponse(
                reason=rtc.RequestResponse.NOT_ALLOWED, message="no publish permission",
                add_track=req)))
            return
        info = models.TrackInfo(
            sid=f"TR_{secrets.token_hex(6)}", type=req.type, name=req.name,
            width=req.width, height=req.height, source=req.source, muted=req.muted,
            simulcast=len(req.layers) > 1, layers=req.layers, stream=req.stream,
            mime_type=("audio/opus" if req.type == models.AUDIO else ""))
        p.tracks.append(info)
        await self._send(p, rtc.SignalResponse(
            track_published=rtc.TrackPublishedResponse(cid=req.cid, track=info)))
        await self._announce(p)

    async def _announce(self, p: Participant) -> None:
        """Tell the others in ``p``'s room who ``p`` is now."""
        if _hidden(p):
            return
        update = rtc.SignalResponse(update=rtc.ParticipantUpdate(participants=[p.info()]))
        for o in self.live():
            if o.room == p.room and o is not p:
                await self._send(o, update)

    async def _drop(self, p: Participant, *, duplicate: bool = False) -> None:
        if p.left:
            return
        p.left = True
        if duplicate:
            await self._send(p, rtc.SignalResponse(leave=rtc.LeaveRequest(
                reason=models.DUPLICATE_IDENTITY, action=rtc.LeaveRequest.DISCONNECT)))
        with contextlib.suppress(Exception):
            await p.ws.close()
        await p.pc.close()
        await cancel_and_wait(p.tasks)
        await self._announce(p)

    # -- media and data ----------------------------------------------------------------

    def _wire(self, p: Participant) -> None:
        pc = p.pc

        @pc.on("datachannel")
        def on_channel(ch: RTCDataChannel) -> None:
            p.channels[ch.label] = ch

            @ch.on("message")
            def on_message(data: str | bytes) -> None:
                if isinstance(data, bytes):
                    self._relay(p, data)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in pc.getTransceivers()
                            if t.receiver.track is track)
            self._tap_reports(p, track.kind, receiver)
            if track.kind == "video":
                receiver._RTCRtpReceiver__remote_bitrate_estimator = _AmpleLink()  # type: ignore[attr-defined]
            p.tasks.append(asyncio.create_task(self._read(p, track, receiver)))

    def _tap_reports(self, p: Participant, kind: str, receiver: RTCRtpReceiver) -> None:
        reports = p.media.reports.setdefault(kind, [])
        original = receiver._handle_rtcp_packet

        async def tap(packet: Any) -> None:
            if isinstance(packet, RtcpSrPacket):
                info = packet.sender_info
                reports.append(Report(time.monotonic(), _ntp_s(info.ntp_timestamp),
                                      info.rtp_timestamp))
            await original(packet)

        receiver._handle_rtcp_packet = tap  # type: ignore[method-assign]

    async def _read(self, p: Participant, track: MediaStreamTrack,
                    receiver: RTCRtpReceiver) -> None:
        keep = self.keep
        try:
            while True:
                frame = await track.recv()
                at = time.monotonic()
                assert frame.pts is not None
                rtp = rtp_timestamp(frame.pts, receiver)
                if isinstance(frame, av.VideoFrame):
                    kept = None
                    if keep is not None:
                        y = frame.to_ndarray(format="yuv420p")[: frame.height]
                        kept = keep(y)
                    p.media.pictures.append(Picture(at, rtp, frame.width, frame.height, kept))
                elif isinstance(frame, av.AudioFrame):
                    pcm = frame.to_ndarray().reshape(-1)[:: len(frame.layout.channels)]
                    p.media.sounds.append(Sound(at, rtp, frame.sample_rate, pcm.copy()))
        except MediaStreamError:
            pass

    def _relay(self, sender: Participant, data: bytes) -> None:
        sender.data_in += 1
        try:
            packet = models.DataPacket.FromString(data)
        except Exception:
            return
        packet.participant_identity = sender.identity
        packet.participant_sid = sender.sid
        to = set(packet.destination_identities)
        label = "_lossy" if packet.kind == models.DataPacket.LOSSY else "_reliable"
        out = packet.SerializeToString()
        for o in self.live():
            if o is sender or o.room != sender.room or (to and o.identity not in to):
                continue
            ch = o.channels.get(label) or o.channels.get("_reliable")
            if ch is not None and ch.readyState == "open":
                ch.send(out)


def _hidden(p: Participant) -> bool:
    return bool(p.claims.video and p.claims.video.hidden)


def _pad(s: str) -> str:
    s = urllib.parse.unquote(s)
    return s + "=" * (-len(s) % 4)
