"""The lip-sync lag measurement (``rapido.pipeline.lipsync_lag``): checked on synthetic
pictures with a known shift, then applied to what a real node records."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import av
import pytest

from rapido.gpu.portrait import default_avatar
from rapido.pipeline.lipsync_lag import LagMeter, mouth_region
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.speech import syllables
from tests.conftest import NodeFactory, create_session
from tests.test_ws import next_event, send_jittered

FPS = 25
FRAME = AUDIO_RATE // FPS


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
