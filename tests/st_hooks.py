"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS): send generated binary bodies
for the audio media types as they are, like application/octet-stream, and WHEP's SDP
offers as text."""

from __future__ import annotations

import schemathesis

schemathesis.serializer.alias(["audio/wav", "audio/L16"], "application/octet-stream")
schemathesis.serializer.alias(["application/sdp"], "text/plain")
