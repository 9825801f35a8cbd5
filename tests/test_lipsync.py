"""Lip sync is real: the mouth follows the audio, and silence is the idle picture.

A real node with the built-in model records a session (lossless H.264, so frames can be
compared exactly) fed through its WebSocket with synthetic speech that alternates speech
and silence, inside utterances and between them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from rapido.gpu.portrait import default_avatar
from rapido.pipeline.media import AUDIO_RATE
from tests.conftest import NodeFactory, create_session, speech
from tests.test_ws import next_event, send_jittered

FRAME = AUDIO_RATE // 25


def decode(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    with av.open(str(path)) as c:
        video = [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return video, audio.astype(np.float64)


@pytest.mark.slow
async def test_mouth_follows_audio_energy(make_node: NodeFactory, tmp_path: Path,
                                          http: aiohttp.ClientSession) -> None:
    node = await make_node(record_crf=0, recordings_dir=str(tmp_path / "rec"))
    s = await create_session(http, node, "lipsync", sample_rate=16_000, sink="record")
    gap = np.zeros(int(0.5 * 16_000), dtype=np.int16)
    async with http.ws_connect(s["ws_url"]) as ws:
        await next_event(ws, "ready")
        for k in range(3):
            # One utterance: speech, a pause inside it, speech again.
            utterance = np.concatenate([speech(0.8, seed=k), gap, speech(0.6, seed=10 + k)])
            await send_jittered(ws, utterance, jitter_s=0.01)
            await ws.send_json({"type": "end"})
            await next_event(ws, "playback_finished")
            # Silence between utterances: nothing is sent. 0.8 s leaves a few frames with
            # silence 6 frames either side (the check below) in each gap; 0.6 s left 19
            # in all once playback started at 96 ms and stretched (bound: > 20).
            await asyncio.sleep(0.8)
    async with http.delete(f"{node.url}/api/sessions/{s['session_id']}") as r:
        stats = (await r.json())["stats"]
    video, audio = decode(Path(stats["sink"]["path"]))
    avatar = default_avatar()
    n = min(len(video), len(audio) // FRAME)
    assert n > 100

    mx, my, mw, mh = (int(v) for v in avatar.mouth_boxes[0])
    pad = 12
    change, energy, silent_exact, silent_total = [], [], 0, 0
    for i in range(n):
        frame, idle = video[i], avatar.idle_i420(i)
        region = (slice(my - pad, my + mh + pad), slice(mx - pad, mx + mw + pad))
        change.append(float(np.mean(np.abs(frame[region].astype(np.float64)
                                           - idle[region].astype(np.float64)))))
        # The mouth shows the sound heard with its frame, smoothed over ~+-25 ms: the
        # frame's 40 ms and half a frame either side.
        window = audio[max(0, i * FRAME - FRAME // 2) : (i + 1) * FRAME + FRAME // 2]
        energy.append(float(np.sqrt(np.mean(window ** 2))) if len(window) else 0.0)
        around = audio[max(0, (i - 6) * FRAME) : (i + 7) * FRAME]
        if len(around) and np.max(np.abs(around)) < 1e-3:
            silent_total += 1
            silent_exact += int(np.array_equal(frame, idle))
    pearson = float(np.corrcoef(change, energy)[0, 1])
    print(f"pearson r = {pearson:.3f} over {n} frames; {silent_total} frames in silence, "
          f"{silent_exact} of them exactly idle")
    assert pearson >= 0.6, pearson
    # Frames with silence all around them are exactly the idle frames.
    assert silent_total > 20
    assert silent_exact == silent_total
    # Speaking frames really moved the mouth.
    assert max(change) > 5
