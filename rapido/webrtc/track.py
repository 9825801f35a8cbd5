"""The media tracks that feed aiortc's senders: a viewer's end of a shared encoder.

For a packet (not a frame) aiortc's ``RTCRtpSender`` only packetises
(``encoder.pack``), so a track whose ``recv()`` returns the shared ``av.Packet`` costs
each viewer RTP framing and SRTP, not an encode. A viewer also needs a keyframe to
start: its video track drops packets until one arrives, and asks for one when it joins
and whenever it has to drop what it holds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final, Protocol

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

#: Packets a viewer may have waiting (about 2 s of video): a viewer whose connection
#: stalls this long is resynchronised at the next keyframe rather than buffered forever.
VIEWER_QUEUE: Final = 50


class PacketSource(Protocol):
    """The fan-out a :class:`PacketTrack` reads from (the webrtc sink)."""

    def attach(self, track: PacketTrack) -> None:
        """The track's sender started reading: deliver its codec's packets to it."""
        ...

    def detach(self, track: PacketTrack) -> None:
        """The track stopped: deliver nothing more to it."""
        ...

    def request_keyframe(self, codec: str) -> None: ...


class PacketTrack(MediaStreamTrack):
    """A viewer's end of a shared encoder: ``recv()`` yields already encoded packets.

    The track joins its encoder's fan-out on the first ``recv()``, i.e. when the
    viewer's connection is up and its sender starts reading, so nothing piles up for a
    viewer still doing ICE and no encoder runs for viewers that never connect."""

    def __init__(self, source: PacketSource, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._source = source
        self.codec: str | None = None
        self._queue: deque[av.Packet] = deque()
        self._wake = asyncio.Event()
        self._joined = False
        # Video can only be decoded from a keyframe on; audio from any packet.
        self.needs_keyframe = kind == "video"
        self.dropped = 0

    def bind(self, codec: str) -> None:
        self.codec = codec

    async def recv(self) -> av.Packet:
        if self.readyState != "live" or self.codec is None:
            raise MediaStreamError
        if not self._joined:
            self._joined = True
            self._source.attach(self)
        while not self._queue:
            self._wake.clear()
            await self._wake.wait()
            if self.readyState != "live":
                raise MediaStreamError
        return self._queue.popleft()

    def push(self, packet: av.Packet, keyframe: bool) -> None:
        if self.needs_keyframe:
            if not keyframe:
                return
            self.needs_keyframe = False
        if len(self._queue) >= VIEWER_QUEUE:
            self.dropped += len(self._queue)
            self._queue.clear()
            if self.kind == "video":
                # The packets just dropped were references for what follows.
                self.needs_keyframe = True
                assert self.codec is not None
                self._source.request_keyframe(self.codec)
                if not keyframe:
                    return
                self.needs_keyframe = False
        self._queue.append(packet)
        self._wake.set()

    def flush(self) -> None:
        """Drop what is waiting (barge-in); video then restarts at a keyframe."""
        if not self._queue:
            return
        self.dropped += len(self._queue)
        self._queue.clear()
        if self.kind == "video" and self.codec is not None:
            self.needs_keyframe = True
            self._source.request_keyframe(self.codec)

    def stop(self) -> None:
        super().stop()
        self._wake.set()
        self._source.detach(self)
