"""A WHEP viewer for ``bench --http --viewers K``: what a listener hears, and when.

A real aiortc peer (audio only, no ICE servers: loopback) watches one session's WebRTC
output and stamps every decoded 20 ms audio frame twice: the loop time it came out of
aiortc's receiver (its jitter buffer and Opus decoder included, as at any WebRTC
client), and the time its RTP packet arrived. The two differ by aiortc's audio jitter
buffer, which holds each frame until four more have arrived (``prefetch=4``: 80 ms on
a loss-free link; a browser's NetEQ adapts its delay to the link's jitter, a few tens
of ms on loopback). The bench compares both with when it sent each utterance's audio:
speech to first audible audio at a viewer (issue 13), not only to the node's
``playback_started`` event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from rapido.aio import cancel_and_wait

#: An int16 sample louder than this is speech. Opus decodes the node's digital silence
#: between utterances to (near) zero; the bench's speech peaks near 20,000.
AUDIBLE = 1000


def first_audible(samples: np.ndarray) -> int | None:
    """Index of the first sample louder than :data:`AUDIBLE` (in any channel of a
    (samples, channels) array), or None."""
    loud = np.abs(samples.astype(np.int32)) > AUDIBLE
    where = np.flatnonzero(loud.any(axis=1) if loud.ndim > 1 else loud)
    return int(where[0]) if len(where) else None


def rtp_timestamp(pts: int, receiver: Any) -> int:
    """The RTP timestamp of a frame an aiortc receiver handed over: aiortc gives frames
    pts = RTP timestamp - the first one seen, and keeps that origin private (aiortc 1.x)."""
    origin: int = receiver._RTCRtpReceiver__timestamp_mapper._origin
    return (pts + origin) & 0xFFFFFFFF


def stamp_arrivals(receiver: Any, seen: dict[int, float], clock: Callable[[], float]
                   ) -> None:
    """Record in ``seen`` the ``clock()`` time of each RTP timestamp's first packet, as
    it reaches the receiver, before its jitter buffer and decoder. aiortc has no public
    hook there: its receiver's packet handler is wrapped (aiortc 1.x)."""
    original = receiver._handle_rtp_packet

    async def handle(packet: Any, arrival_time_ms: int) -> None:
        seen.setdefault(packet.timestamp, clock())
        await original(packet, arrival_time_ms=arrival_time_ms)

    receiver._handle_rtp_packet = handle


@dataclass
class Heard:
    """One decoded audio frame: when it came out of the receiver (``at``) and when its
    packet arrived (``arrived``), and where in it (in seconds) the first audible sample
    sits (None: silent)."""

    at: float
    audible_s: float | None
    arrived: float | None = None


def viewer_onsets(sent: list[tuple[float, float]], heard: list[Heard], until: float,
                  *, by_arrival: bool = False) -> tuple[list[float], int]:
    """Speech to first audible audio, per utterance.

    ``sent``: per utterance, (loop time its chunk holding the first audible sample left
    the client, that sample's offset into the chunk in seconds). The utterance is heard
    where sound begins (an audible frame after a silent one) first after it was sent
    and before the next utterance was; its onset is when the *chunk's start* was heard
    (the audible sample's time less its offset) minus when the chunk left. This assumes
    the earlier utterance has gone quiet at the viewer by then (the bench pauses 0.5 s
    or more between utterances; the node buffers a few hundred ms at most).
    Utterances sent after ``until`` are not judged (the viewer may have closed before
    they played); those judged but never heard are counted as missed. ``by_arrival``:
    frames placed at their packet's arrival instead of their decoding (those with no
    arrival are left out)."""
    def when(h: Heard) -> float | None:
        return h.arrived if by_arrival else h.at

    starts = [t + h.audible_s for prev, h in zip([None, *heard], heard, strict=False)
              if h.audible_s is not None and (prev is None or prev.audible_s is None)
              and (t := when(h)) is not None]
    out: list[float] = []
    missed = 0
    k = 0
    for i, (t_sent, offset) in enumerate(sent):
        if t_sent > until:
            break
        t_next = sent[i + 1][0] if i + 1 < len(sent) else float("inf")
        while k < len(starts) and starts[k] <= t_sent:
            k += 1
        if k < len(starts) and starts[k] < t_next:
            out.append(starts[k] - offset - t_sent)
        else:
            missed += 1
    return out, missed


@dataclass
class WhepViewer:
    """``await connect()``, then :attr:`heard` fills until :meth:`aclose`."""

    http: aiohttp.ClientSession
    url: str
    token: str
    heard: list[Heard] = field(default_factory=list)
    location: str | None = None
    _pc: RTCPeerConnection | None = None
    _reader: asyncio.Task[None] | None = None
    _first: asyncio.Event = field(default_factory=asyncio.Event)
    _arrivals: dict[int, float] = field(default_factory=dict)

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Offer, answer, and wait for the first decoded audio frame."""
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        receiver = pc.addTransceiver("audio", direction="recvonly").receiver
        stamp_arrivals(receiver, self._arrivals, asyncio.get_running_loop().time)
        got_track: asyncio.Future[MediaStreamTrack] = \
            asyncio.get_running_loop().create_future()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if not got_track.done():
                got_track.set_result(track)

        await pc.setLocalDescription(await pc.createOffer())
        async with self.http.post(self.url, data=pc.localDescription.sdp,
                                  headers={"Content-Type": "application/sdp",
                                           "Authorization": f"Bearer {self.token}"}) as r:
            if r.status != 201:
                raise RuntimeError(f"WHEP offer: HTTP {r.status} {await r.text()}")
            self.location = r.headers.get("Location")
            answer = await r.text()
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        async with asyncio.timeout(timeout_s):
            track = await got_track
            self._reader = asyncio.create_task(self._read(track, receiver),
                                               name="whep-viewer-read")
            await self._first.wait()

    async def _read(self, track: MediaStreamTrack, receiver: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await track.recv()
                now = loop.time()
                assert isinstance(frame, av.AudioFrame) and frame.pts is not None
                arrived = self._arrivals.pop(rtp_timestamp(frame.pts, receiver), None)
                pcm = frame.to_ndarray()  # (1, samples x channels), interleaved s16
                channels = len(frame.layout.channels)
                samples = pcm.reshape(-1, channels)
                first = first_audible(samples)
                self.heard.append(Heard(now, None if first is None
                                        else first / frame.sample_rate, arrived))
                self._first.set()
        except MediaStreamError:
            pass

    async def aclose(self) -> None:
        if self._reader is not None:
            await cancel_and_wait([self._reader])
        if self._pc is not None:
            await self._pc.close()
