"""LiveKitPublisher: the ``livekit`` sink provider.

Per session it picks the region (nearest with room, see :mod:`rapido.livekit.regions`),
mints the publisher's token (publish-only, room ``lesson_{lesson_id}``, an identity
unique per node and session), builds the :class:`LiveKitSink`, and for a LiveKit Agents
voice agent's avatar runs the :class:`AgentBridge` on every room the sink connects to.
The session's JSON gets the region, the server URL and a subscribe-only viewer token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from livekit import rtc

from rapido.livekit.bridge import AgentBridge
from rapido.livekit.regions import Region, select_region
from rapido.livekit.sink import LiveKitSink
from rapido.livekit.tokens import publisher_identity, publisher_token, room_name, viewer_token
from rapido.pipeline.errors import AdmissionError, SinkUnavailable
from rapido.pipeline.session import SessionSpec, StreamSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveKitSettings:
    """Filled from the Config's ``livekit_*`` settings (rapido.wiring)."""

    api_key: str
    api_secret: str
    token_ttl_s: float
    width: int
    height: int
    fps: int
    queue_size_ms: int
    video_codec: str
    max_bitrate: int
    min_bitrate: int
    simulcast: bool
    min_fps: float | None  # None: never shed frame rate
    max_queued_audio_s: float  # an agent's speech waiting for its session, at most


class LiveKitPublisher:
    def __init__(self, settings: LiveKitSettings, regions: Sequence[Region], *,
                 on_connect: Callable[[float], None] | None = None,
                 on_degraded: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.regions = list(regions)
        self._on_connect = on_connect
        self._on_degraded = on_degraded
        self._region: dict[str, Region] = {}  # session id -> the region it publishes to
        self._bridges: dict[str, AgentBridge] = {}  # sessions serving a LiveKit agent
        self._rooms: dict[str, rtc.Room] = {}  # an agent session's room, until bound

    @property
    def bridges(self) -> int:
        """Agent sessions being served."""
        return len(self._bridges)

    def open(self, spec: SessionSpec, session_id: str, node_id: str) -> LiveKitSink:
        cfg = self.settings
        if not (cfg.api_key and cfg.api_secret) or not self.regions:
            raise SinkUnavailable("this node does not publish to LiveKit: it has no LiveKit "
                                  "credentials (livekit_api_key / livekit_api_secret) or no "
                                  "region (livekit_url / livekit_regions_file)")
        load: dict[str, int] = {}
        for r in self._region.values():
            load[r.name] = load.get(r.name, 0) + 1
        region = select_region(self.regions, spec.user_location, load, {})
        if region is None:
            raise AdmissionError("no_livekit_region",
                                 "no LiveKit region is configured or has room for another "
                                 "stream", retry_after_s=30)
        room = spec.room or room_name(spec.lesson_id)
        identity = publisher_identity(node_id or "node", session_id)
        agent = spec.agent_identity
        key, secret, ttl = cfg.api_key, cfg.api_secret, cfg.token_ttl_s
        on_degraded = self._on_degraded

        def on_state(state: str, reason: str | None) -> None:
            if state == "degraded":
                if on_degraded is not None:
                    on_degraded()
                log.warning("session %s: LiveKit %s degraded: %s", session_id, region.name,
                            reason)

        sink = LiveKitSink(
            url=region.url,
            token_factory=lambda: publisher_token(key, secret, room=room, identity=identity,
                                                  ttl_s=ttl, agent_identity=agent),
            width=cfg.width, height=cfg.height, fps=cfg.fps,
            queue_size_ms=cfg.queue_size_ms, video_codec=cfg.video_codec,
            max_bitrate=cfg.max_bitrate, min_bitrate=cfg.min_bitrate,
            simulcast=cfg.simulcast, min_fps=cfg.min_fps,
            on_connect=self._on_connect, on_state=on_state,
            on_room=(lambda r: self._room_connected(session_id, r))
            if agent is not None else None)
        self._region[session_id] = region
        return sink

    def _room_connected(self, session_id: str, room: rtc.Room) -> None:
        if session_id not in self._region:
            return  # released: the session is closing, its sink connected meanwhile
        bridge = self._bridges.get(session_id)
        if bridge is not None:
            bridge.attach(room)
        else:  # connected before the session was bound: attach it then
            self._rooms[session_id] = room

    def bind(self, session: StreamSession) -> None:
        agent = session.spec.agent_identity
        if agent is None:
            return
        bridge = AgentBridge(session, agent_identity=agent,
                             max_queued_s=self.settings.max_queued_audio_s)
        self._bridges[session.id] = bridge
        room = self._rooms.pop(session.id, None)
        if room is not None:
            bridge.attach(room)

    async def release(self, session: StreamSession) -> None:
        # The agent is no longer served; the region keeps counting the session until
        # its sink has left the room (closed).
        self._rooms.pop(session.id, None)
        bridge = self._bridges.pop(session.id, None)
        if bridge is not None:
            await bridge.aclose()

    def closed(self, session: StreamSession) -> None:
        self._region.pop(session.id, None)
        self._rooms.pop(session.id, None)

    def describe(self, session: StreamSession) -> dict[str, Any]:
        """Where the session publishes, and a subscribe-only token for its room."""
        region = self._region.get(session.id)
        if region is None:
            return {}
        room = session.spec.room or room_name(session.lesson_id)
        cfg = self.settings
        return {"region": region.name, "livekit_url": region.url, "room_name": room,
                "viewer_token": viewer_token(cfg.api_key, cfg.api_secret, room=room,
                                             ttl_s=cfg.token_ttl_s)}

    async def aclose(self) -> None:
        pass
