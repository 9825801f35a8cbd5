"""The LiveKit Agents avatar protocol driving a real session (no server needed: the
agent's side is played by feeding the protocol what the room would deliver)."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from rapido.livekit.agents import OutgoingRpc
from rapido.livekit.bridge import AgentBridge
from tests.conftest import NodeFactory, speech


async def wait_for(sent: list[OutgoingRpc], n: int, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if len(sent) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {len(sent)} RPCs: {sent}")


async def test_segment_plays_and_is_reported(make_node: NodeFactory) -> None:
    node = await make_node(model="none")
    from rapido.pipeline.session import SessionSpec

    session, _ = await node.engine.create_session(SessionSpec(lesson_id="agent",
                                                              sample_rate=16_000))
    sent: list[OutgoingRpc] = []
    bridge = AgentBridge(session, agent_identity="agent-1", send=sent.append)
    try:
        # The agent's TTS at 24 kHz stereo, faster than real time, as one segment.
        mono = speech(0.8, rate=24_000)
        stereo = np.stack([mono, mono], axis=1).astype("<i2").tobytes()
        bridge.protocol.begin_segment({"sample_rate": "24000", "num_channels": "2"})
        for i in range(0, len(stereo), 4800):
            bridge.protocol.push(stereo[i : i + 4800])
        bridge.protocol.end_segment()
        await wait_for(sent, 2)
        assert [r.method for r in sent] == ["lk.playback_started", "lk.playback_finished"]
        done = json.loads(sent[1].payload)
        assert done["interrupted"] is False
        assert abs(done["playback_position"] - 0.8) <= 0.04

        # A second segment, cleared mid-way: exactly one interrupted finish.
        bridge.protocol.begin_segment({"sample_rate": "24000", "num_channels": "1"})
        bridge.protocol.push(speech(3.0, rate=24_000).astype("<i2").tobytes())
        await wait_for(sent, 3)
        assert sent[2].method == "lk.playback_started"
        await asyncio.sleep(0.3)
        for rpc in bridge.protocol.clear():
            bridge.send(rpc)
        bridge.protocol.end_segment()
        await wait_for(sent, 4)
        await asyncio.sleep(0.3)
        finishes = [json.loads(r.payload) for r in sent[3:]
                    if r.method == "lk.playback_finished"]
        assert len(finishes) == 1 and finishes[0]["interrupted"] is True
        assert 0.0 <= finishes[0]["playback_position"] < 3.0
        assert session.state == "interrupted"
    finally:
        await bridge.aclose()
