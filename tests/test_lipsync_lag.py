"""The lip-sync lag measurement (``rapido.pipeline.lipsync_lag``): first checked on
synthetic pictures whose mouth follows the sound with a known shift, then applied to what
a real node records and to what a real WebRTC viewer decodes, with the built-in model
(``rapido-lite``), whose mouth must match the sound heard with it."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import RtcpSrPacket

from rapido.aio import cancel_and_wait
from rapido.bench.viewer import rtp_timestamp
from rapido.gpu.portrait import default_avatar
from rapido.pipeline.lipsync_lag import LagMeter, measure_lag, mouth_region
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.speech import speech_like, syllables
from tests.conftest import NodeFactory, create_session
from tests.test_ws import next_event, send_jittered

FPS = 25
FRAME = AUDIO_RATE // FPS

# --- the measurement, on pictures with a known shift -------------------------------------

#: How a synthetic mouth opens (0..1) with the RMS of the sound it shows: linear, in dB
#: (a compressive curve, as rapido-lite's), and squared (expansive).
MAPPINGS: dict[str, Callable[[float], float]] = {
    "linear": lambda rms: min(1.0, rms / 0.15),
    "db": lambda rms: float(np.clip((20 * np.log10(max(rms, 1e-6)) + 45) / 35, 0, 1)),
    "squared": lambda rms: min(1.0, (rms / 0.15) ** 2),
}


def synthetic(shift_ms: float, opening: Callable[[float], float], *, seconds: float = 8.0,
              seed: int = 1, voice: Callable[..., np.ndarray] = syllables,
              t0: float = 3.7) -> LagMeter:
    """A stream whose picture at ``t`` shows a mouth (an ellipse, as a picture would)
    opened by the sound of ``[t - shift, t - shift + 40 ms)``: its mouth moves
    ``shift_ms`` after the sound. Audio comes in 20 ms pieces, pictures at 25 fps, both
    from ``t0`` on an arbitrary clock."""
    a = voice(seconds + 1.0, rate=AUDIO_RATE, seed=seed).astype(np.float64) / 32768.0
    m = LagMeter(AUDIO_RATE)
    piece = AUDIO_RATE // 50
    for i in range(a.size // piece):
        m.add_audio(t0 + i * piece / AUDIO_RATE, a[i * piece : (i + 1) * piece])
    yy, xx = np.mgrid[0:40, 0:60]
    for i in range(2, int(seconds * FPS)):
        at = round((i / FPS - shift_ms / 1000.0) * AUDIO_RATE)
        seg = a[max(0, at) : max(0, at + FRAME)]
        o = opening(float(np.sqrt(np.mean(seg**2))) if seg.size else 0.0)
        inside = ((xx - 30) / 20) ** 2 + ((yy - 20) / (1 + 15 * o)) ** 2 < 1
        m.add_picture(t0 + i / FPS, np.where(inside, 60, 200).astype(np.uint8))
    return m


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
@pytest.mark.parametrize("shift_ms", [-80.0, -40.0, 0.0, 40.0, 80.0])
def test_a_known_shift_is_recovered(shift_ms: float, mapping: str) -> None:
    res = synthetic(shift_ms, MAPPINGS[mapping]).result()
    assert abs(res.lag_ms - shift_ms) <= 10.0, (res.lag_ms, shift_ms)
    assert res.margin > 0.2


def test_sub_frame_shifts_are_resolved() -> None:
    """Shifts between the 40 ms frames come out between them, not at the nearest frame."""
    for shift in (-13.0, 17.0, 29.0):
        res = synthetic(shift, MAPPINGS["db"]).result()
        assert abs(res.lag_ms - shift) <= 5.0, (res.lag_ms, shift)


def test_streams_pool_and_audio_gaps_are_silence() -> None:
    pooled = measure_lag([synthetic(40.0, MAPPINGS["linear"], seed=s) for s in (2, 3)])
    assert abs(pooled.lag_ms - 40.0) <= 10.0
    m = LagMeter(AUDIO_RATE)
    m.add_audio(1.0, np.full(480, 10_000, np.int16))
    m.add_audio(1.02, np.full(480, 10_000, np.int16))  # 10 ms after the first piece ended
    m.add_audio(1.025, np.full(480, 10_000, np.int16))  # overlaps the second by 5 ms
    t0, db = m.loudness()
    assert t0 == 1.0 and db.size == 35
    assert (db[10:20] < db[0] - 30).all() and (db[20:] == db[0]).all()


def test_a_periodic_voice_is_reported_ambiguous() -> None:
    """speech_like's syllables come at exactly 4 Hz: every 125 ms (an opening or a
    closing) the correlation peaks again, and the margin says so."""
    res = synthetic(0.0, MAPPINGS["db"], voice=speech_like).result()
    assert res.margin < 0.1
    peaks = res.lags_ms[1:-1][(res.curve[1:-1] > res.curve[:-2])
                              & (res.curve[1:-1] >= res.curve[2:]) & (res.curve[1:-1] > 0.5)]
    assert any(abs(p + 125) < 15 for p in peaks) and any(abs(p - 125) < 15 for p in peaks)


# --- a recording -------------------------------------------------------------------------


def recorded_lag(path: Path) -> tuple[LagMeter, int]:
    """A recording's pictures and sound, each placed at its decoded pts."""
    avatar = default_avatar()
    meter = LagMeter(AUDIO_RATE)
    with av.open(str(path)) as c:
        for af in c.decode(audio=0):
            assert af.pts is not None and af.time_base is not None
            meter.add_audio(float(af.pts * af.time_base), af.to_ndarray().reshape(-1))
    n = 0
    with av.open(str(path)) as c:
        for vf in c.decode(video=0):
            assert vf.pts is not None and vf.time_base is not None
            y = vf.to_ndarray(format="yuv420p")[: vf.height]
            region = mouth_region(avatar.mouth_boxes, 12, vf.width, vf.height)
            meter.add_picture(float(vf.pts * vf.time_base), y[region])
            n += 1
    return meter, n


@pytest.mark.slow
async def test_recording_lag(make_node: NodeFactory, tmp_path: Path,
                             http: aiohttp.ClientSession) -> None:
    node = await make_node(record_crf=0, recordings_dir=str(tmp_path / "rec"))
    s = await create_session(http, node, "lag", sample_rate=16_000, sink="record")
    async with http.ws_connect(s["ws_url"]) as ws:
        await next_event(ws, "ready")
        for k in range(2):
            await send_jittered(ws, syllables(4.0, seed=20 + k), jitter_s=0.01)
            await ws.send_json({"type": "end"})
            await next_event(ws, "playback_finished")
            await asyncio.sleep(0.3)
    async with http.delete(f"{node.url}/api/sessions/{s['session_id']}") as r:
        stats = (await r.json())["stats"]
    meter, n = recorded_lag(Path(stats["sink"]["path"]))
    res = meter.result()
    print(f"recording: lag {res.lag_ms:+.1f} ms, r {res.corr:.2f}, margin {res.margin:.2f}, "
          f"{res.frames} frames")
    assert n > 150
    assert res.margin > 0.2, "the correlation has no single peak"
    assert abs(res.lag_ms) <= 40.0, res.lag_ms


# --- at a real WebRTC viewer ------------------------------------------------------------


def _ntp_s(ntp: int) -> float:
    return (ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32


@dataclass
class _Watched:
    """What an aiortc WHEP viewer decoded, on the RTP clock of each kind, and the
    sender reports that place those clocks on the sender's wall clock."""

    pictures: list[tuple[int, np.ndarray]] = field(default_factory=list)  # rtp, mouth
    sound: list[tuple[int, np.ndarray]] = field(default_factory=list)  # rtp, mono
    reports: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def sender_time(self, kind: str, rtp: int, clock: int) -> float:
        """Where the sender's reports put RTP time ``rtp``: the median over reports,
        as a receiver's A/V sync does with the latest (each is one packet's send time)."""
        reports = self.reports.get(kind, [])
        assert reports, f"no sender report for {kind}"
        return float(np.median([ntp + _signed32(rtp - r) / clock for ntp, r in reports]))

    def meter(self) -> LagMeter:
        m = LagMeter(AUDIO_RATE)
        for rtp, pcm in self.sound:
            m.add_audio(self.sender_time("audio", rtp, AUDIO_RATE), pcm)
        for rtp, region in self.pictures:
            m.add_picture(self.sender_time("video", rtp, 90_000), region)
        return m


def _signed32(d: int) -> int:
    d &= 0xFFFFFFFF
    return d - (1 << 32) if d >= 1 << 31 else d


async def _watch_decoded(http: aiohttp.ClientSession, whep_url: str, token: str
                         ) -> tuple[RTCPeerConnection, _Watched, list[asyncio.Task[None]]]:
    """A WHEP viewer (as tests/test_webrtc.py) that keeps each decoded picture's mouth
    region and each decoded sound, and taps the RTCP sender reports."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    seen = _Watched()
    tasks: list[asyncio.Task[None]] = []
    region_of = functools.partial(mouth_region, default_avatar().mouth_boxes, 12)
    for t in pc.getTransceivers():
        reports = seen.reports.setdefault(t.kind, [])
        original = t.receiver._handle_rtcp_packet

        async def tap(packet: Any, _orig: Any = original,
                      _reports: list[tuple[float, int]] = reports) -> None:
            if isinstance(packet, RtcpSrPacket):
                info = packet.sender_info
                _reports.append((_ntp_s(info.ntp_timestamp), info.rtp_timestamp))
            await _orig(packet)

        t.receiver._handle_rtcp_packet = tap  # type: ignore[method-assign]

    async def read(track: MediaStreamTrack, receiver: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                assert frame.pts is not None
                rtp = rtp_timestamp(frame.pts, receiver)
                if isinstance(frame, av.VideoFrame):
                    y = frame.to_ndarray(format="yuv420p")[: frame.height]
                    seen.pictures.append(
                        (rtp, y[region_of(frame.width, frame.height)].copy()))
                else:
                    assert isinstance(frame, av.AudioFrame)
                    pcm = frame.to_ndarray()
                    # Packed stereo interleaves the channels; both carry the mono source.
                    channels = len(frame.layout.channels)
                    seen.sound.append((rtp, pcm.reshape(-1)[::channels].copy()))
        except MediaStreamError:
            pass

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        receiver = next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)
        tasks.append(asyncio.ensure_future(read(track, receiver)))

    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(whep_url, data=pc.localDescription.sdp,
                         headers={"Content-Type": "application/sdp",
                                  "Authorization": f"Bearer {token}"}) as r:
        assert r.status == 201, await r.text()
        answer = await r.text()
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, seen, tasks


@pytest.mark.slow
async def test_lag_at_a_webrtc_viewer(make_node: NodeFactory,
                                      http: aiohttp.ClientSession) -> None:
    # min_fps 25: the in-process viewer's decoding shares the node's cores, and must not
    # thin the frames being measured.
    node = await make_node(min_fps=25)
    s = await create_session(http, node, "lag-rtc", sample_rate=16_000, sink="webrtc")
    pc, seen, tasks = await _watch_decoded(http, s["whep_url"], s["viewer_token"])
    try:
        async with http.ws_connect(s["ws_url"]) as ws:
            await next_event(ws, "ready")
            deadline = time.monotonic() + 10
            while not (seen.pictures and seen.sound):
                assert time.monotonic() < deadline, "the viewer got no media"
                await asyncio.sleep(0.05)
            await send_jittered(ws, syllables(6.0, seed=31), jitter_s=0.01)
            await ws.send_json({"type": "end"})
            await next_event(ws, "playback_finished")
            await asyncio.sleep(1.6)  # past the last sender report's interval
    finally:
        await pc.close()
        await cancel_and_wait(tasks)
    res = seen.meter().result()
    print(f"webrtc viewer: lag {res.lag_ms:+.1f} ms, r {res.corr:.2f}, "
          f"margin {res.margin:.2f}, {res.frames} frames")
    assert res.frames > 150
    assert res.margin > 0.2, "the correlation has no single peak"
    assert abs(res.lag_ms) <= 40.0, res.lag_ms
