"""The LiveKit Agents avatar protocol (livekit-agents ``voice/avatar/``), avatar side.

An agent sends its speech as byte streams on topic ``lk.audio_stream`` (attributes
``sample_rate`` and ``num_channels``, interleaved s16le; one stream per segment, closing
it ends the segment), may call ``lk.clear_buffer`` on us to barge in, and expects
``lk.playback_started`` / ``lk.playback_finished`` (``{"playback_position": s,
"interrupted": bool}``) back. If a ``playback_finished`` does not come soon after a
clear, the agent assumes one, so we always send it.

:class:`AvatarProtocol` is the message-level state machine, with no I/O, so it is tested
without a server; :class:`AvatarWorker` is the thin binding to an ``rtc.Room``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from livekit import rtc

from rapido.aio import cancel_and_wait

log = logging.getLogger(__name__)

AUDIO_STREAM_TOPIC: Final = "lk.audio_stream"
RPC_CLEAR_BUFFER: Final = "lk.clear_buffer"
RPC_PLAYBACK_STARTED: Final = "lk.playback_started"
RPC_PLAYBACK_FINISHED: Final = "lk.playback_finished"

IDLE: Final = "idle"
RECEIVING: Final = "receiving"  # stream open, nothing played yet
PLAYING: Final = "playing"
FINISHED: Final = "finished"
INTERRUPTED: Final = "interrupted"

MIN_RATE, MAX_RATE, MAX_CHANNELS = 8000, 48000, 8


class ProtocolError(ValueError):
    """A message from the agent that does not follow the protocol."""


@dataclass(frozen=True, slots=True)
class OutgoingRpc:
    """An RPC the avatar must perform on the agent."""

    method: str
    payload: str


def parse_audio_attributes(attributes: Mapping[str, str] | None) -> tuple[int, int]:
    """``(sample_rate, num_channels)`` of a segment; ProtocolError if missing or bad."""
    attrs = attributes or {}
    try:
        rate = int(attrs["sample_rate"])
        channels = int(attrs["num_channels"])
    except KeyError as exc:
        raise ProtocolError(f"audio stream lacks the {exc.args[0]!r} attribute") from None
    except (TypeError, ValueError):
        raise ProtocolError(f"audio stream attributes must be integers, got "
                            f"sample_rate={attrs.get('sample_rate')!r} "
                            f"num_channels={attrs.get('num_channels')!r}") from None
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError(f"sample_rate must be in {MIN_RATE}..{MAX_RATE}, got {rate}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError(f"num_channels must be in 1..{MAX_CHANNELS}, got {channels}")
    return rate, channels


def playback_finished_payload(position_ms: float, interrupted: bool) -> str:
    return json.dumps({"playback_position": round(max(0.0, position_ms) / 1000.0, 3),
                       "interrupted": bool(interrupted)})


@dataclass(slots=True)
class _Segment:
    id: int
    rate: int
    channels: int
    state: str = RECEIVING
    input_open: bool = True
    discard: bool = False  # cleared while its stream was still open


class AvatarProtocol:
    """One avatar session's side of the protocol.

    ``feed(samples)`` gets mono int16 at ``out_rate`` (the session's input rate);
    ``on_segment_start()`` / ``on_segment_end()`` bracket each segment (map them to the
    session's ``start_utterance`` / ``end_utterance``); ``on_clear()`` is the barge-in
    (``session.interrupt()``). The session's playback events go in through
    :meth:`playback_started` and :meth:`playback_finished`, which return the RPC to send.
    Segments play in order; the playback events always apply to the oldest one.
    """

    def __init__(
        self,
        *,
        out_rate: int,
        feed: Callable[[np.ndarray], None],
        on_segment_start: Callable[[], None] | None = None,
        on_segment_end: Callable[[], None] | None = None,
        on_clear: Callable[[], None] | None = None,
    ) -> None:
        if not MIN_RATE <= out_rate <= MAX_RATE:
            raise ValueError(f"out_rate must be in {MIN_RATE}..{MAX_RATE}, got {out_rate}")
        self.out_rate = out_rate
        self._feed = feed
        self._on_start = on_segment_start
        self._on_end = on_segment_end
        self._on_clear = on_clear
        self._segments: deque[_Segment] = deque()
        self._receiving: _Segment | None = None
        self._rest = b""  # bytes of a partial sample frame, carried to the next chunk
        self._resampler: rtc.AudioResampler | None = None
        self._next_id = 0
        self._last_state = IDLE
        self.segments_received = 0
        self.clears = 0
        self.samples_fed = 0

    @property
    def state(self) -> str:
        """The oldest unfinished segment's state, else how the last one ended (or idle)."""
        return self._segments[0].state if self._segments else self._last_state

    # -- agent -> avatar ------------------------------------------------------------------

    def begin_segment(self, attributes: Mapping[str, str] | None) -> int:
        """A new ``lk.audio_stream`` opened. Returns its segment id."""
        rate, channels = parse_audio_attributes(attributes)
        if self._receiving is not None:
            # A well-behaved agent closes a stream before opening the next; if not, the
            # old one is over anyway.
            self.end_segment()
        seg = _Segment(self._next_id, rate, channels)
        self._next_id += 1
        self._segments.append(seg)
        self._receiving = seg
        self._rest = b""
        self._resampler = (None if rate == self.out_rate
                           else rtc.AudioResampler(rate, self.out_rate, num_channels=1))
        self.segments_received += 1
        if self._on_start is not None:
            self._on_start()
        return seg.id

    def push(self, data: bytes) -> None:
        """Bytes of the open segment's stream (interleaved s16le, any split)."""
        seg = self._receiving
        if seg is None:
            raise ProtocolError("audio data outside a segment")
        if seg.discard:
            return
        data = self._rest + data
        frame_bytes = 2 * seg.channels
        usable = len(data) - len(data) % frame_bytes
        self._rest = data[usable:]
        if usable:
            pcm = np.frombuffer(data[:usable], dtype="<i2").reshape(-1, seg.channels)
            self._emit(self._convert(pcm))

    def end_segment(self) -> None:
        """The stream closed: the segment's input is complete."""
        seg = self._receiving
        if seg is None:
            return
        self._receiving = None
        seg.input_open = False
        self._rest = b""  # half a sample at the end is noise, not speech
        if seg.discard:
            self._resampler = None
            with contextlib.suppress(ValueError):
                self._segments.remove(seg)
            return
        if self._resampler is not None:
            tail = [np.frombuffer(f.data, dtype=np.int16) for f in self._resampler.flush()]
            self._resampler = None
            if tail:
                self._emit(np.concatenate(tail))
        if self._on_end is not None:
            self._on_end()

    def clear(self) -> list[OutgoingRpc]:
        """``lk.clear_buffer``: barge in. Calls ``on_clear`` (which should flush the
        session and report its PlaybackFinished through :meth:`playback_finished`), then
        makes sure the agent gets exactly one ``playback_finished(interrupted=true)``
        for the segment that was current, even one that had not started playing."""
        self.clears += 1
        out: list[OutgoingRpc] = []
        head = self._segments[0] if self._segments else None
        if head is not None:
            head.state = INTERRUPTED  # so the session's finish event reports interrupted
        if self._on_clear is not None:
            self._on_clear()
        if head is not None and self._segments and self._segments[0] is head:
            # The session reported nothing for it (it had not started, or on_clear is
            # asynchronous): answer for it now.
            out.append(self._finish(0.0, interrupted=True))
        if self._receiving is not None:
            self._receiving.discard = True
        # Anything queued behind was cleared too; the agent only waits for one answer.
        self._segments = deque(s for s in self._segments if s is self._receiving)
        for s in self._segments:
            s.state = INTERRUPTED
        if self._segments:
            self._last_state = INTERRUPTED
        return out

    # -- session -> agent ----------------------------------------------------------------

    def playback_started(self) -> OutgoingRpc | None:
        """The session's PlaybackStarted for the oldest segment."""
        head = self._head()
        if head is None or head.state != RECEIVING:
            return None
        head.state = PLAYING
        return OutgoingRpc(RPC_PLAYBACK_STARTED, "{}")

    def playback_finished(self, position_ms: float, interrupted: bool) -> OutgoingRpc | None:
        """The session's PlaybackFinished for the oldest segment."""
        head = self._head()
        if head is None:
            return None
        return self._finish(position_ms, interrupted or head.state == INTERRUPTED)

    # -- internals -----------------------------------------------------------------------

    def _head(self) -> _Segment | None:
        # A discarded segment still open only waits for its stream to close.
        for seg in self._segments:
            if not seg.discard:
                return seg
        return None

    def _finish(self, position_ms: float, interrupted: bool) -> OutgoingRpc:
        seg = self._head()
        assert seg is not None
        self._segments.remove(seg)
        seg.state = INTERRUPTED if interrupted else FINISHED
        self._last_state = seg.state
        return OutgoingRpc(RPC_PLAYBACK_FINISHED,
                           playback_finished_payload(position_ms, interrupted))

    def _convert(self, pcm: np.ndarray) -> np.ndarray:
        # Downmix by averaging in int32 so loud stereo does not wrap around.
        mono = (pcm[:, 0].astype(np.int16) if pcm.shape[1] == 1 else
                np.clip(pcm.astype(np.int32).mean(axis=1).round(), -32768, 32767)
                .astype(np.int16))
        if self._resampler is None or not len(mono):
            return mono
        seg_rate = self._receiving.rate if self._receiving is not None else self.out_rate
        frame = rtc.AudioFrame(mono.tobytes(), seg_rate, 1, len(mono))
        frames = self._resampler.push(frame)
        if not frames:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames])

    def _emit(self, samples: np.ndarray) -> None:
        if len(samples):
            self.samples_fed += len(samples)
            self._feed(samples)


class AvatarWorker:
    """Binds an :class:`AvatarProtocol` to a connected ``rtc.Room``.

    ``agent_identity`` is the agent we serve; its streams are the only ones accepted
    (another participant's audio on the topic is ignored). RPCs go out in order through
    one task, so ``playback_started`` never overtakes the ``playback_finished`` before it.
    """

    def __init__(self, room: rtc.Room, protocol: AvatarProtocol, *, agent_identity: str,
                 rpc_timeout_s: float = 5.0,
                 wait_room: Callable[[], Awaitable[None]] | None = None) -> None:
        self.room = room
        self.protocol = protocol
        self.agent_identity = agent_identity
        self.rpc_timeout_s = rpc_timeout_s
        #: Back-pressure: awaited after each piece of audio; while it waits, the agent's
        #: stream is not read further.
        self._wait_room = wait_room
        self.clears_refused = 0
        self._outbox: asyncio.Queue[OutgoingRpc] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sender: asyncio.Task[None] | None = None
        self.rpc_errors = 0

    def start(self) -> None:
        self.room.register_byte_stream_handler(AUDIO_STREAM_TOPIC, self._on_stream)
        self.room.local_participant.register_rpc_method(RPC_CLEAR_BUFFER, self._on_clear)
        self._sender = asyncio.create_task(self._send_loop(), name="rapido-avatar-rpc")

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            self.room.unregister_byte_stream_handler(AUDIO_STREAM_TOPIC)
            self.room.local_participant.unregister_rpc_method(RPC_CLEAR_BUFFER)
        await cancel_and_wait([*self._tasks, self._sender])

    def send(self, rpc: OutgoingRpc | None) -> None:
        """Queue an RPC from :meth:`AvatarProtocol.playback_started` / ``_finished``."""
        if rpc is not None:
            self._outbox.put_nowait(rpc)

    def _on_stream(self, reader: rtc.ByteStreamReader, participant_identity: str) -> None:
        if participant_identity != self.agent_identity:
            log.warning("avatar: ignoring audio stream from %s", participant_identity)
            reader.close()
            return
        task = asyncio.create_task(self._read(reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, reader: rtc.ByteStreamReader) -> None:
        try:
            self.protocol.begin_segment(reader.info.attributes)
        except ProtocolError as exc:
            log.warning("avatar: rejected audio stream: %s", exc)
            reader.close()
            return
        try:
            async for chunk in reader:
                self.protocol.push(chunk)
                if self._wait_room is not None:
                    await self._wait_room()
        except Exception as exc:  # aborted by the sender or the room went away
            log.warning("avatar: audio stream ended abnormally: %s", exc)
        finally:
            self.protocol.end_segment()

    def _on_clear(self, data: rtc.RpcInvocationData) -> str:
        if data.caller_identity != self.agent_identity:
            # Anyone in the room can call us; only the agent we speak for may barge in.
            self.clears_refused += 1
            log.warning("avatar: refused %s from %s (we serve %s)", RPC_CLEAR_BUFFER,
                        data.caller_identity, self.agent_identity)
            raise rtc.RpcError(rtc.RpcError.ErrorCode.APPLICATION_ERROR,
                               "only the agent this avatar serves may clear its buffer")
        for rpc in self.protocol.clear():
            self.send(rpc)
        return "ok"

    async def _send_loop(self) -> None:
        while True:
            rpc = await self._outbox.get()
            try:
                await self.room.local_participant.perform_rpc(
                    destination_identity=self.agent_identity, method=rpc.method,
                    payload=rpc.payload, response_timeout=self.rpc_timeout_s)
            except Exception as exc:
                # The agent may not implement playback_started (older versions): log, go on.
                self.rpc_errors += 1
                log.info("avatar: %s to %s failed: %s", rpc.method, self.agent_identity, exc)
