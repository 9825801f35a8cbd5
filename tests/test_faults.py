"""Faults stay local: a failing model batch shows idle frames and the streams go on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import NodeFactory, create_session, eventually, speech
from tests.test_ws import next_event, send_jittered


@pytest.fixture
def faulty_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "faulty.json"
    path.write_text(json.dumps({"name": "faulty", "format": "torch", "crop_size": 96,
                                "torch_factory": "tests.models.faulty:build_oom"}))
    return path


async def test_failed_batches_show_idle_frames_and_streams_go_on(
        make_node: NodeFactory, faulty_manifest: Path, http: aiohttp.ClientSession) -> None:
    """The model runs out of device memory on loud input, as a GPU under pressure does."""
    node = await make_node(model=str(faulty_manifest))
    assert node.engine.renderer.info()["backend"]["backend"] == "torch"
    s = await create_session(http, node, "faulty")
    session = node.engine.sessions[s["session_id"]]
    async with http.ws_connect(s["ws_url"]) as ws:
        await next_event(ws, "ready")
        await send_jittered(ws, speech(1.0), jitter_s=0.0)
        await ws.send_json({"type": "end"})
        finished = await next_event(ws, "playback_finished")
    assert finished["interrupted"] is False and abs(finished["position_ms"] - 1000) <= 40
    info = node.engine.renderer.info()
    assert info["frames_failed"] > 0
    assert info["batcher"]["failures"] > 0
    assert session.counters.degraded_frames >= info["frames_failed"] // 2
    before = session.counters.frames_out
    await eventually(lambda: session.counters.frames_out - before >= 8, "the stream goes on")
    async with http.get(f"{node.url}/metrics") as r:
        text = await r.text()
    assert 'batch_failures_total{model="faulty"}' in text
    # Each such batch is a GPU memory error in the node's health (it rolls a rollout of
    # this node's version back).
    failures = info["batcher"]["failures"]
    assert f'gpu_memory_errors_total{{model="faulty"}} {float(failures)}' in text
    assert node.health.figures().gpu_memory_errors == failures


@pytest.mark.slow
async def test_overload_degrades_to_half_rate(make_node: NodeFactory,
                                              http: aiohttp.ClientSession) -> None:
    """wav2lip-96 on two CPU cores takes ~40 ms a frame: three speaking streams are
    more than it can do, so the node must degrade on purpose and keep every stream
    moving rather than stall."""
    node = await make_node(model="wav2lip-96", frame_budget_ms=200)
    sessions = [await create_session(http, node, f"busy{i}") for i in range(3)]

    async def speak(s: dict[str, object]) -> dict[str, object]:
        async with http.ws_connect(str(s["ws_url"])) as ws:
            await next_event(ws, "ready")
            await send_jittered(ws, speech(3.0), jitter_s=0.0)
            await ws.send_json({"type": "end"})
            return await next_event(ws, "playback_finished", timeout=30)

    results = await asyncio.gather(*(speak(s) for s in sessions))
    info = node.engine.renderer.info()
    assert all(abs(float(str(r["position_ms"])) - 3000) <= 40 for r in results)
    assert info["frames_repeated"] > 0 or info["frames_failed"] > 0
    async with http.get(f"{node.url}/metrics") as r:
        text = await r.text()
    quality = [float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("video_quality_score")]
    assert quality and quality[0] <= 1.0
    for s in sessions:
        session = node.engine.sessions[str(s["session_id"])]
        assert session.counters.frames_out >= 75  # 3 s of speech went out as frames
