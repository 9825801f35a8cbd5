"""What the HTTP layer needs to know of the node's configuration, typed and nothing more."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HttpSettings:
    api_key: str = ""  # empty: no auth (the node then listens on loopback only)
    public_url: str = ""  # empty: from each request
    max_body_bytes: int = 16 * 1024 * 1024
    max_ws_message_bytes: int = 256 * 1024
    default_sink: str = "null"
    webrtc_token_ttl_s: float = 3600.0
    # Reported in every session's JSON.
    region: str = "local"
    width: int = 854
    height: int = 480
    fps: int = 25

    @property
    def auth_required(self) -> bool:
        return bool(self.api_key)
