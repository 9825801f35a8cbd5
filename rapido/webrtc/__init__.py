"""WebRTC output: a session served to WHEP viewers, each stream encoded once per codec.

Laid out like aiortc: :mod:`~rapido.webrtc.sink` (``WebRtcSink``: viewers, SDP, the
fan-out), :mod:`~rapido.webrtc.encoders` (the shared per-codec encoders),
:mod:`~rapido.webrtc.track` (the packet tracks aiortc's senders read),
:mod:`~rapido.webrtc.sdp` (offer checks), :mod:`~rapido.webrtc.ice` (ICE server URLs)
and :mod:`~rapido.webrtc.patches` (every tap into aiortc's internals).

Layering: this package builds on :mod:`rapido.pipeline` and :mod:`rapido.aio` only;
the pipeline never imports it.
"""

from rapido.webrtc.encoders import H264, OPUS, VIDEO_CODECS, VP8
from rapido.webrtc.sdp import InvalidOffer
from rapido.webrtc.sink import SinkClosed, WebRtcSink
from rapido.webrtc.track import PacketTrack

__all__ = ["H264", "OPUS", "VIDEO_CODECS", "VP8", "InvalidOffer", "PacketTrack", "SinkClosed",
           "WebRtcSink"]
