"""Every place rapido reaches into aiortc's internals, in one module.

aiortc's public API has no way to share one encoder between senders nor to see a
sender's RTCP, so each viewer's ``RTCRtpSender`` gets the two taps below. They touch
private attributes (``_send_keyframe``, ``_handle_rtcp_packet``, ``_ssrc``), so an
aiortc upgrade is checked here first (``tests/test_webrtc.py`` exercises both).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCRtpSender

log = logging.getLogger(__name__)


def redirect_keyframe_requests(sender: RTCRtpSender, request: Callable[[], None]) -> None:
    """Make a PLI/FIR from this sender's viewer call ``request``.

    Why: aiortc turns PLI/FIR into a flag (``_send_keyframe``) that only its own encode
    path reads; a sender fed already encoded packets (:class:`~rapido.webrtc.track.
    PacketTrack`) never looks at it, so the shared encoder must be asked instead."""
    sender._send_keyframe = request  # type: ignore[method-assign]


def tap_rtcp(sender: RTCRtpSender, viewer_id: str,
             on_feedback: Callable[[str, int, Any], None]) -> None:
    """Let ``on_feedback(viewer_id, ssrc, packet)`` see this sender's RTCP before
    aiortc does.

    Why: adaptive quality needs each viewer's receiver reports (loss) and REMB, which
    aiortc reads and keeps to itself. ``ssrc`` is the sender's own, so the callback can
    pick this stream's report blocks out of a compound packet. A failing callback is
    logged and never breaks aiortc's own handling of the packet."""
    original: Callable[[Any], Awaitable[None]] = sender._handle_rtcp_packet

    async def handle(packet: Any) -> None:
        try:
            on_feedback(viewer_id, sender._ssrc, packet)
        except Exception:  # feedback must never break the viewer's RTCP handling
            log.exception("webrtc sink: bad RTCP feedback from viewer %s", viewer_id)
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]
