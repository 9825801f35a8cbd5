"""The lip-sync renderer's per-stream crop state lives on the event loop.

The crop a half-rate (degraded) frame repeats is kept when a batch's result reaches the
loop, never from the worker thread, and only while the stream is still on the utterance
the request was made for. A stand-in backend holds the batch in the model until the test
lets it go, so the order of events is fixed without sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from rapido.gpu.lipsync import LipSyncRenderer
from rapido.gpu.portrait import default_avatar
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.media import AUDIO_RATE
from rapido.pipeline.render import FrameJob

FRAME = AUDIO_RATE // 25
WAIT = 5.0  # seconds: a gate not reached by then never will be


class GatedBackend:
    """A contract backend whose ``run`` waits for the test's go-ahead; every crop it
    returns is filled with the number of its call (1, 2, ...)."""

    thread_safe = False
    name = "gated"
    device = "cpu"
    preferred_batch_sizes: tuple[int, ...] = ()

    def __init__(self, crop_size: int = 32) -> None:
        self.crop_size = crop_size
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def run(self, mel: np.ndarray, face: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(WAIT):
            raise RuntimeError("the test never released the batch")
        s = self.crop_size
        return np.full((len(mel), 3, s, s), self.calls / 10.0, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {"name": self.name}

    def close(self) -> None:
        pass


def make_job(avatar: Avatar, index: int, utterance: int, audio: np.ndarray,
             on_done: Callable[[FrameJob], None]) -> FrameJob:
    """Frame ``index`` of a one-frame utterance whose speech is ``audio`` (48 kHz)."""
    loop = asyncio.get_running_loop()
    return FrameJob(index=index, due=loop.time(), audio=audio[:FRAME], speaking=True,
                    avatar=avatar, stream="s", utterance=utterance, utt_pos=0,
                    real_samples=FRAME, lookahead=audio[FRAME:], utt_complete=True,
                    on_done=on_done)


def loud() -> np.ndarray:
    # A steady tone: audible in every mel window (speech_like has silent syllable gaps).
    t = np.arange(FRAME * 12) / AUDIO_RATE
    return (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


async def render(r: LipSyncRenderer, avatar: Avatar, index: int, utterance: int,
                 audio: np.ndarray) -> asyncio.Future[FrameJob]:
    fut: asyncio.Future[FrameJob] = asyncio.get_running_loop().create_future()
    r.submit(make_job(avatar, index, utterance, audio, fut.set_result))
    return fut


async def test_a_delivered_crop_is_kept_for_half_rate_frames() -> None:
    avatar = default_avatar(256, 192)
    backend = GatedBackend()
    backend.release.set()
    r = LipSyncRenderer(backend, max_batch=1, max_wait_ms=0.0, budget_ms=60_000.0)
    try:
        job = await asyncio.wait_for(await render(r, avatar, 0, 1, loud()), WAIT)
        assert job.video is not None and not job.degraded
        assert r.frames_model == 1
        st = r._streams["s"]
        assert st.last_crop is not None and st.last_crop_index == 0
        assert np.all(st.last_crop == np.float32(0.1))
    finally:
        await r.aclose()


async def test_a_late_batch_of_the_previous_utterance_does_not_restore_its_crop() -> None:
    avatar = default_avatar(256, 192)
    backend = GatedBackend()
    r = LipSyncRenderer(backend, max_batch=1, max_wait_ms=0.0, budget_ms=60_000.0)
    try:
        old = await render(r, avatar, 0, 1, loud())
        # Utterance 1's frame is in the model (the worker thread) ...
        assert await asyncio.to_thread(backend.entered.wait, WAIT)
        # ... when utterance 2 starts: the stream's crop state is reset on the loop. Its
        # first frame is silent, so it is answered at once with the idle picture.
        silent = np.zeros(FRAME * 12, dtype=np.int16)
        new = await asyncio.wait_for(await render(r, avatar, 1, 2, silent), WAIT)
        assert new.video is avatar.idle_frame(1)
        st = r._streams["s"]
        assert st.last_crop is None
        # Now utterance 1's batch finishes and is delivered.
        backend.release.set()
        late = await asyncio.wait_for(old, WAIT)
        assert late.video is not None and not late.degraded
        assert r.frames_model == 1
        # Its crop belongs to speech that is no longer playing: a half-rate frame of
        # utterance 2 must not repeat it.
        assert r._streams["s"] is st
        assert st.last_crop is None and st.last_crop_index == -1
    finally:
        await r.aclose()
