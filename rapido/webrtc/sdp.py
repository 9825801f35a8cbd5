"""A viewer's SDP offer checked before aiortc sees it, and what the answer settled."""

from __future__ import annotations

from aiortc.sdp import SessionDescription


class InvalidOffer(ValueError):
    """The viewer's SDP offer could not be used."""


def check_offer(sdp: str) -> None:
    """Raise :class:`InvalidOffer` for a body that is not a usable SDP offer."""
    if not sdp.lstrip().startswith("v=0"):
        raise InvalidOffer("the body is not an SDP offer (it must start with v=0)")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:
        raise InvalidOffer(f"the SDP offer does not parse: {exc}") from None
    if not parsed.media:
        raise InvalidOffer("the offer has no media sections")


def negotiated(answer_sdp: str) -> dict[str, str]:
    """The codec each kind will be sent with: the first one in the answer's m-line,
    which is the one aiortc's sender picks."""
    found: dict[str, str] = {}
    for media in SessionDescription.parse(answer_sdp).media:
        if media.kind in found or media.port == 0:
            continue
        codecs = [c for c in media.rtp.codecs if c.name.lower() != "rtx"]
        if codecs:
            found[media.kind] = codecs[0].mimeType.lower()
    return found
