"""AgentBridge: a LiveKit Agents voice agent's avatar protocol, driving one session.

Agent audio (``lk.audio_stream`` segments) goes into the session in order, through the
same ``feed`` back-pressure as a WebSocket client; ``lk.clear_buffer`` is the session's
interrupt; the session's playback events go back to the agent as ``lk.playback_started``
and ``lk.playback_finished``. The bridge outlives room reconnects: each new room gets a
fresh :class:`AvatarWorker` bound to the same protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import numpy as np
from livekit import rtc

from rapido.aio import cancel_and_wait
from rapido.livekit.agents import AvatarProtocol, AvatarWorker, OutgoingRpc
from rapido.pipeline.events import PlaybackFinished, PlaybackStarted
from rapido.pipeline.session import SessionClosed, StreamSession

log = logging.getLogger(__name__)

_START, _END = "start", "end"


class AgentBridge:
    def __init__(self, session: StreamSession, *, agent_identity: str,
                 send: Callable[[OutgoingRpc], None] | None = None,
                 max_queued_s: float = 120.0) -> None:
        self.session = session
        self.agent_identity = agent_identity
        self._send_override = send
        self._worker: AvatarWorker | None = None
        # Audio and segment marks in arrival order; the pump feeds the session, whose
        # jitter buffer pushes back. The inbox holds at most ``max_queued_s`` of the
        # agent's speech (the same bound as HTTP uploads): beyond it the agent's stream
        # is not read until the session has taken some (``wait_room``).
        self._inbox: asyncio.Queue[np.ndarray | str] = asyncio.Queue()
        self._max_queued = max(1, int(max_queued_s * session.spec.sample_rate))
        self.queued_samples = 0
        self._room = asyncio.Event()
        self._room.set()
        self.protocol = AvatarProtocol(
            out_rate=session.spec.sample_rate, feed=self._enqueue,
            on_segment_start=lambda: self._inbox.put_nowait(_START),
            on_segment_end=lambda: self._inbox.put_nowait(_END),
            on_clear=self._clear)
        self._events = session.subscribe(maxsize=1024)
        self._tasks = [
            asyncio.get_running_loop().create_task(self._pump(), name=f"agent-in-{session.id}"),
            asyncio.get_running_loop().create_task(self._relay(),
                                                   name=f"agent-out-{session.id}"),
        ]

    # -- rooms -----------------------------------------------------------------------

    def attach(self, room: rtc.Room) -> None:
        """A (re)connected room: serve the agent there."""
        old, self._worker = self._worker, AvatarWorker(
            room, self.protocol, agent_identity=self.agent_identity, wait_room=self.wait_room)
        self._worker.start()
        if old is not None:
            asyncio.get_running_loop().create_task(old.aclose(), name="agent-worker-close")

    def send(self, rpc: OutgoingRpc | None) -> None:
        if rpc is None:  # the protocol had nothing to say (e.g. already answered)
            return
        if self._send_override is not None:
            self._send_override(rpc)
        elif self._worker is not None:
            self._worker.send(rpc)

    # -- agent -> session ----------------------------------------------------------------

    def _enqueue(self, samples: np.ndarray) -> None:
        self._inbox.put_nowait(samples)
        self.queued_samples += len(samples)
        if self.queued_samples >= self._max_queued:
            self._room.clear()

    async def wait_room(self) -> None:
        """Returns once less than ``max_queued_s`` of the agent's speech waits here."""
        await self._room.wait()

    def _taken(self, n: int) -> None:
        self.queued_samples -= n
        if self.queued_samples < self._max_queued:
            self._room.set()

    def _clear(self) -> None:
        while not self._inbox.empty():  # audio not yet in the session is cut too
            self._inbox.get_nowait()
        self._taken(self.queued_samples)
        with contextlib.suppress(SessionClosed):
            self.session.interrupt()
        # The interrupt queued its PlaybackFinished (with the position played) for the
        # relay task: pass it on now, so the protocol answers the clear with that
        # position instead of assuming nothing had played (it reported 0.0).
        while not self._events.empty():
            event = self._events.get_nowait()
            if event is None:
                self._events.put_nowait(None)  # the relay task ends on it
                break
            self._on_event(event)

    async def _pump(self) -> None:
        while True:
            item = await self._inbox.get()
            try:
                if isinstance(item, str):
                    if item == _START:
                        self.session.start_utterance()
                    else:
                        await self.session.end_utterance()
                else:
                    self._taken(len(item))
                    await self.session.feed(item)
            except SessionClosed:
                return

    # -- session -> agent --------------------------------------------------------------------

    async def _relay(self) -> None:
        while True:
            event = await self._events.get()
            if event is None:
                return
            self._on_event(event)

    def _on_event(self, event: object) -> None:
        if isinstance(event, PlaybackStarted):
            self.send(self.protocol.playback_started())
        elif isinstance(event, PlaybackFinished):
            self.send(self.protocol.playback_finished(event.position_ms, event.interrupted))

    async def aclose(self) -> None:
        self.session.unsubscribe(self._events)
        await cancel_and_wait(self._tasks)
        if self._worker is not None:
            await self._worker.aclose()
