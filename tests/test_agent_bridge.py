"""The LiveKit Agents avatar protocol driving a real session (no server needed: the
agent's side is played by feeding the protocol what the room would deliver)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest
from livekit import rtc

from rapido.livekit.agents import AvatarWorker, OutgoingRpc
from rapido.livekit.bridge import AgentBridge
from rapido.pipeline.session import SessionSpec
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
        # It reports what played before the clear (about 0.3 s), not 0.
        assert 0.2 <= finishes[0]["playback_position"] <= 0.6, finishes
        assert session.state == "interrupted"
    finally:
        await bridge.aclose()


class _Reader:
    """What the SDK hands a byte-stream handler: ``info.attributes`` and the chunks."""

    def __init__(self, attributes: dict[str, str], chunks: list[bytes]) -> None:
        self.info = SimpleNamespace(attributes=attributes)
        self._chunks = chunks
        self.read = 0
        self.closed = False

    def __aiter__(self) -> _Reader:
        return self

    async def __anext__(self) -> bytes:
        if self.read == len(self._chunks):
            raise StopAsyncIteration
        self.read += 1
        return self._chunks[self.read - 1]

    def close(self) -> None:
        self.closed = True


async def test_agent_audio_is_read_no_faster_than_the_session_takes_it(
        make_node: NodeFactory) -> None:
    """An agent that sends a whole answer at once is read only as far as the bridge's
    bound (``max_queued_s``): the rest waits in the stream, and nothing is lost."""
    node = await make_node(model="none")
    session, _ = await node.engine.create_session(SessionSpec(lesson_id="flood",
                                                              sample_rate=16_000))
    bridge = AgentBridge(session, agent_identity="agent-1", send=lambda rpc: None,
                         max_queued_s=0.5)
    worker = AvatarWorker(rtc.Room(), bridge.protocol, agent_identity="agent-1",
                          wait_room=bridge.wait_room)
    pcm = speech(4.0).astype("<i2").tobytes()
    chunk = 3200  # 100 ms
    reader = _Reader({"sample_rate": "16000", "num_channels": "1"},
                     [pcm[i:i + chunk] for i in range(0, len(pcm), chunk)])
    peak = 0
    try:
        worker._on_stream(reader, "agent-1")  # type: ignore[arg-type]
        for _ in range(200):
            peak = max(peak, bridge.queued_samples)
            await asyncio.sleep(0.01)
        # After 2 s of real time the stream is not read to its end: the agent waits.
        assert reader.read < len(reader._chunks)
        assert peak <= 8000 + 1600, peak  # the bound plus one chunk
        deadline = asyncio.get_running_loop().time() + 10
        while session.jb.stats.received_samples < 4.0 * 48_000 * 0.99:
            assert asyncio.get_running_loop().time() < deadline, "the rest never came"
            await asyncio.sleep(0.05)
        assert reader.read == len(reader._chunks)
    finally:
        await worker.aclose()
        await bridge.aclose()


async def test_only_the_served_agent_may_clear(make_node: NodeFactory) -> None:
    node = await make_node(model="none")
    session, _ = await node.engine.create_session(SessionSpec(lesson_id="clear",
                                                              sample_rate=16_000))
    bridge = AgentBridge(session, agent_identity="agent-1", send=lambda rpc: None)
    worker = AvatarWorker(rtc.Room(), bridge.protocol, agent_identity="agent-1")
    try:
        other = rtc.RpcInvocationData(request_id="r1", caller_identity="mallory",
                                      payload="", response_timeout=5.0)
        with pytest.raises(rtc.RpcError):
            worker._on_clear(other)
        assert worker.clears_refused == 1 and bridge.protocol.clears == 0
        agent = rtc.RpcInvocationData(request_id="r2", caller_identity="agent-1",
                                      payload="", response_timeout=5.0)
        assert worker._on_clear(agent) == "ok"
        assert bridge.protocol.clears == 1
    finally:
        await worker.aclose()
        await bridge.aclose()
