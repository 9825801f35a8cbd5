"""The device path of the lip-sync renderer: a torch backend's batch stays on its device
(model output, repeated crops, blending, colour conversion) and comes down once per
batch. Run here on CPU tensors, forced on; it must draw what the host path draws."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
import torch

from rapido.gpu.contract import DeviceOutput
from rapido.gpu.lipsync import LipSyncRenderer
from rapido.gpu.portrait import default_avatar
from rapido.gpu.torch_backend import TorchBackend
from rapido.pipeline.avatar import Avatar
from rapido.pipeline.media import VideoFrame
from rapido.pipeline.render import FrameJob
from tests.test_backends import S, build_toy
from tests.test_lipsync_crops import FRAME, WAIT, GatedBackend, loud


def _backend() -> TorchBackend:
    return TorchBackend(build_toy(), crop_size=S)


def test_run_device_leaves_the_same_crops_on_the_device() -> None:
    b = _backend()
    assert isinstance(b, DeviceOutput)
    rng = np.random.default_rng(1)
    mel = rng.standard_normal((3, 1, 80, 16)).astype(np.float32)
    face = rng.random((3, 6, S, S), dtype=np.float32)
    out = b.run_device(mel, face)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.device == torch.device("cpu") and tuple(out.shape) == (3, 3, S, S)
    np.testing.assert_allclose(out.numpy(), b.run(mel, face), atol=1e-6)
    with pytest.raises(ValueError, match="face must be float32"):
        b.run_device(mel, face[:, :, :8, :8])


def _job(avatar: Avatar, stream: str, index: int, audio: np.ndarray,
         on_done: Callable[[FrameJob], None]) -> FrameJob:
    loop = asyncio.get_running_loop()
    at = index * FRAME
    return FrameJob(index=index, due=loop.time(), audio=audio[at:at + FRAME], speaking=True,
                    avatar=avatar, stream=stream, utterance=1, utt_pos=at,
                    real_samples=FRAME, lookahead=audio[at + FRAME:], utt_complete=True,
                    on_done=on_done)


async def _draw(r: LipSyncRenderer, avatar: Avatar, frames: int, *, degraded: bool = False
                ) -> dict[tuple[str, int], VideoFrame]:
    """Two streams' frames, in ticks; with ``degraded`` odd frames repeat a crop."""
    audio = {"a": loud(), "b": (loud() // 3)[::-1].copy()}
    done: list[FrameJob] = []
    for n in range(frames):
        r.degraded = degraded
        tick = asyncio.Event()

        def finished(job: FrameJob, tick: asyncio.Event = tick) -> None:
            done.append(job)
            tick.set()
        for stream in audio:
            r.submit(_job(avatar, stream, n, np.tile(audio[stream], 2), finished))
        async with asyncio.timeout(WAIT):
            while len(done) < 2 * (n + 1):
                await tick.wait()
                tick.clear()
    assert all(j.video is not None and j.video is not avatar.idle_frame(j.index)
               for j in done)
    return {(j.stream, j.index): j.video for j in done if j.video is not None}


@pytest.mark.parametrize("degraded", [False, True])
async def test_the_device_path_draws_what_the_host_path_draws(degraded: bool) -> None:
    avatar = default_avatar(256, 192)
    host = LipSyncRenderer(_backend(), max_batch=4, max_wait_ms=0.0, budget_ms=60_000.0,
                           device_compositing=False)
    dev = LipSyncRenderer(_backend(), max_batch=4, max_wait_ms=0.0, budget_ms=60_000.0,
                          device_compositing=True)
    try:
        want = await _draw(host, avatar, 4, degraded=degraded)
        got = await _draw(dev, avatar, 4, degraded=degraded)
        assert got.keys() == want.keys()
        for key, frame in got.items():
            diff = np.abs(frame.data.astype(int) - want[key].data.astype(int))
            assert diff.max() <= 1, key
        if degraded:  # odd frames repeated the kept crop, here a tensor
            assert dev.frames_repeated == host.frames_repeated == 4
            assert isinstance(dev._streams["a"].last_crop, torch.Tensor)
        assert dev.frames_model == host.frames_model
    finally:
        await host.aclose()
        await dev.aclose()


def test_the_device_path_is_chosen_only_where_it_helps_or_is_asked() -> None:
    assert LipSyncRenderer(_backend())._device is None  # a CPU backend: host path
    assert LipSyncRenderer(_backend(), device_compositing=True)._device is not None
    with pytest.raises(ValueError, match="cannot leave its output on a device"):
        LipSyncRenderer(GatedBackend(), device_compositing=True)
