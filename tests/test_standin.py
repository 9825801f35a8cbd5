"""The bench's free-model stand-in: the contract kept, the wait taken with the GIL
released, and a bench run over it."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rapido.bench.run import run_once
from rapido.bench.standin import STANDIN, StandinBackend, StandinModel
from rapido.config import Config
from rapido.gpu.manifest import FACE_CHANNELS, MEL_BINS, MEL_FRAMES
from rapido.gpu.registry import ModelSettings, resolve_model


def _batch(b: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.random((b, 1, MEL_BINS, MEL_FRAMES), np.float32),
            rng.random((b, FACE_CHANNELS, s, s), np.float32))


def test_it_returns_the_reference_face_after_its_wait_with_the_gil_released() -> None:
    backend = StandinBackend(96, latency_ms=50.0, max_batch=8)
    mel, face = _batch(4, 96)
    spins = 0
    stop = threading.Event()

    def spin() -> None:  # runs only while another thread gives the GIL away
        nonlocal spins
        while not stop.is_set():
            spins += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        while spins == 0:
            time.sleep(0.001)
        s0, t0 = spins, time.perf_counter()
        out = backend.run(mel, face)
        took, during = time.perf_counter() - t0, spins - s0
    finally:
        stop.set()
        t.join()
    assert took >= 0.05
    # A wait in C that kept the GIL would let the other thread run not at all.
    assert during > 1000, "the other thread barely ran: the wait held the GIL"
    assert out.shape == (4, 3, 96, 96) and out.dtype == np.float32
    np.testing.assert_array_equal(out, face[:, 3:])
    assert backend.batches == 1 and backend.info()["latency_ms"] == 50.0


def test_a_batch_off_the_contract_is_refused() -> None:
    backend = StandinBackend(96, latency_ms=0.0, max_batch=4)
    mel, face = _batch(8, 96)
    with pytest.raises(ValueError, match=r"outside 1\.\.4"):
        backend.run(mel, face)
    mel, face = _batch(2, 64)
    with pytest.raises(ValueError, match="face must be float32"):
        backend.run(mel, face)
    assert backend.batches == 0
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="latency_ms"):
            StandinBackend(96, latency_ms=bad, max_batch=4)


def test_it_borrows_rapido_lites_geometry(model_dir: Path) -> None:
    settings = ModelSettings(model="rapido-lite", model_dir=model_dir, backend="auto",
                             device="auto", dtype="auto", intra_op_threads=1,
                             trt_cache_dir=None)
    backend, manifest = StandinModel(3.0)(settings, 16)
    lite = resolve_model("rapido-lite", model_dir)
    assert manifest.name == STANDIN and "3 ms a batch" in manifest.description
    assert (manifest.crop_size, manifest.blend, manifest.mel_offset_frames) == (
        lite.crop_size, lite.blend, lite.mel_offset_frames)
    assert backend.crop_size == lite.crop_size and backend.max_batch == 16
    assert backend.preferred_batch_sizes[-1] == 16


async def test_a_bench_run_over_the_stand_in(model_dir: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(Config(), model_dir=str(model_dir),
                                 recordings_dir=str(tmp_path / "rec"),
                                 avatars_dir=str(tmp_path / "avatars"), log_level="warning")
    r = await run_once(config, 2, 1.5, 0.5, 1.0, "null", standin=StandinModel(2.0))
    assert r.model == STANDIN and r.streams == 2
    assert r.fps_min >= 24.0 and r.batches > 0 and r.underruns == 0
    # Its mouth does not move: no lag is claimed for it.
    assert r.lipsync_lag_ms is None and r.lipsync_corr is None
