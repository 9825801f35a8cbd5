"""A viewer's SDP offer checked before aiortc sees it, and what the answer settled."""

from __future__ import annotations

from aiortc.sdp import SessionDescription


class InvalidOffer(ValueError):
    """The viewer's SDP offer could not be used."""


def check_offer(sdp: str) -> SessionDescription:
    """The offer, parsed; raises :class:`InvalidOffer` for a body that is not a usable
    SDP offer."""
    if not sdp.lstrip().startswith("v=0"):
        raise InvalidOffer("the body is not an SDP offer (it must start with v=0)")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:
        raise InvalidOffer(f"the SDP offer does not parse: {exc}") from None
    if not parsed.media:
        raise InvalidOffer("the offer has no media sections")
    return parsed


def has_candidates(offer: SessionDescription) -> bool:
    """Whether the offer carries any ICE candidate of its own.

    WHEP has no trickle route here (a PATCH is answered 405), so an offer that carries
    candidates is complete: the sink signals end-of-candidates for it, and aioice stops
    waiting for more (its checks fail, and the viewer goes, once every pair failed). An
    offer with none can still connect, through the peer-reflexive candidates learned
    from the viewer's own checks against the answer's candidates; it is left open for
    those, and the connect timeout bounds the wait."""
    return any(m.ice_candidates for m in offer.media)


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
