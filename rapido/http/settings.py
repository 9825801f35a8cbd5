"""What the HTTP layer needs to know of the node's configuration, typed and nothing more."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpSettings:
    """Filled from the Config (rapido.wiring), whose defaults are the only ones."""

    api_key: str  # empty: no auth (the node then listens on loopback only)
    public_url: str  # empty: from each request
    max_body_bytes: int
    max_ws_message_bytes: int
    max_concurrent_uploads: int  # audio uploads read and checked at once (429 above)
    default_sink: str
    webrtc_token_ttl_s: float
    ws_token_ttl_s: float  # a session's WebSocket token (browsers connect with it)
    http_read_timeout_s: float  # a request's headers and its body must arrive within it
    demo_grace_s: float  # a demo session ends this long after its script played out
    # A session on another node: REST and WHEP answered 307 to it rather than proxied.
    cluster_redirect: bool
    # Reported in every session's JSON.
    region: str
    node_version: str  # what this node announces as its version (GET /api/cluster)
    health_drills: bool  # POST /api/admin/health/drill allowed (rehearsing a rollback)
    width: int
    height: int
    fps: int

    @property
    def auth_required(self) -> bool:
        return bool(self.api_key)
