"""RecorderSink against real libx264/AAC encoding and decoding (no mocks)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from rapido.pipeline.media import AUDIO_RATE, MediaChunk, VideoFrame, frame_samples
from rapido.pipeline.sinks.base import Sink
from rapido.pipeline.sinks.recorder import RecorderSink, SinkError

FPS = 25
SPF = frame_samples(FPS)


# -- inputs ----------------------------------------------------------------------------


def make_picture(index: int, width: int, height: int) -> np.ndarray:
    """A smooth grey gradient with a bright square that moves every frame."""
    data = np.empty((height * 3 // 2, width), dtype=np.uint8)
    ramp = np.linspace(60, 180, width, dtype=np.float32)
    data[:height] = ramp.astype(np.uint8)[None, :]
    side = height // 4
    x = (index * 7) % (width - side)
    y = height // 3
    data[y : y + side, x : x + side] = 220
    data[height:] = 128  # neutral chroma for both U and V
    data.flags.writeable = False  # as the pipeline hands them out
    return data


def make_audio(n_samples: int) -> np.ndarray:
    """A 200 Hz -> 3 kHz chirp plus a 440 Hz tone: distinctive at every lag."""
    t = np.arange(n_samples) / AUDIO_RATE
    duration = n_samples / AUDIO_RATE
    f0, f1 = 200.0, 3000.0
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * duration)))
    tone = np.sin(2 * np.pi * 440.0 * t)
    return (0.3 * 32767 * chirp + 0.15 * 32767 * tone).astype(np.int16)


def make_chunk(index: int, width: int, height: int, audio: np.ndarray) -> MediaChunk:
    return MediaChunk(
        index=index,
        video=VideoFrame(make_picture(index, width, height), width, height),
        audio=audio[index * SPF : (index + 1) * SPF],
        speaking=True,
    )


# -- decoding helpers ------------------------------------------------------------------


@dataclass
class Decoded:
    frame_indices: list[int]  # from each picture's pts
    lumas: list[np.ndarray]
    key_indices: list[int]
    audio: np.ndarray  # float32 in [-1, 1]

    @property
    def video_seconds(self) -> float:
        return (self.frame_indices[-1] + 1) / FPS if self.frame_indices else 0.0

    @property
    def audio_seconds(self) -> float:
        return len(self.audio) / AUDIO_RATE


def decode(path: Path) -> Decoded:
    indices: list[int] = []
    lumas: list[np.ndarray] = []
    keys: list[int] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            assert frame.pts is not None and frame.time_base is not None
            index = round(float(frame.pts * frame.time_base) * FPS)
            indices.append(index)
            lumas.append(frame.to_ndarray(format="yuv420p")[: frame.height].copy())
            if frame.key_frame:
                keys.append(index)
    pieces: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for aframe in container.decode(audio=0):
            pieces.append(aframe.to_ndarray().reshape(-1).astype(np.float32))
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return Decoded(indices, lumas, keys, audio)


def best_lag(reference: np.ndarray, got: np.ndarray, max_lag: int = 4096) -> int:
    """Lag (in samples) by which ``got`` trails ``reference``, via FFT correlation."""
    n = len(reference) + len(got)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(got, size) * np.conj(np.fft.rfft(reference, size)), size)
    lags = np.concatenate([np.arange(0, max_lag + 1), np.arange(-max_lag, 0)])
    values = np.concatenate([corr[: max_lag + 1], corr[-max_lag:]])
    return int(lags[int(np.argmax(values))])


def aligned_correlation(reference: np.ndarray, got: np.ndarray, lag: int) -> float:
    if lag >= 0:
        got = got[lag:]
    else:
        reference = reference[-lag:]
    n = min(len(reference), len(got))
    a = reference[:n].astype(np.float64)
    b = got[:n].astype(np.float64)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


async def wait_encoded(sink: RecorderSink, frames: int) -> None:
    # Polled: the worker thread has no loop-side event to await.
    for _ in range(1500):
        if sink.playout_frames >= frames:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"worker encoded only {sink.playout_frames}/{frames} in 15 s")


# -- tests -----------------------------------------------------------------------------


def test_is_a_sink(tmp_path: Path) -> None:
    sink = RecorderSink(tmp_path / "a.mp4", width=320, height=240, fps=FPS)
    assert isinstance(sink, Sink)
    assert sink.kind == "record"


@pytest.mark.parametrize(("width", "height"), [(854, 480), (320, 240)])
async def test_recording_decodes_to_what_was_sent(tmp_path: Path, width: int, height: int) -> None:
    frames = 3 * FPS
    audio = make_audio(frames * SPF)
    path = tmp_path / "deep" / "er" / "session.mp4"
    sink = RecorderSink(path, width=width, height=height, fps=FPS)
    await sink.start()
    for i in range(frames):
        sink.write(make_chunk(i, width, height, audio))
    sink.interrupt()
    await sink.aclose()

    stats = sink.stats().json()
    assert stats["frames_written"] == frames == sink.playout_frames
    assert stats["audio_samples_written"] == frames * SPF
    assert stats["dropped_frames"] == 0
    assert stats["queue_depth"] == 0
    assert stats["interrupts"] == 1
    assert stats["error"] is None
    assert stats["path"] == str(path)
    assert stats["bytes"] == path.stat().st_size > 0

    out = decode(path)
    assert out.frame_indices == list(range(frames))
    assert out.key_indices == [0, FPS, 2 * FPS]  # GOP = fps: one keyframe a second
    assert out.video_seconds == pytest.approx(frames / FPS)
    assert abs(out.video_seconds - out.audio_seconds) <= 1 / FPS

    sent = audio.astype(np.float32) / 32768
    assert abs(len(out.audio) - len(sent)) <= 1024
    lag = best_lag(sent, out.audio)
    # The edit list written thanks to delay_moov hides the AAC priming delay, so the
    # decoded audio starts in step with the video.
    assert abs(lag) <= 48, f"audio is {lag} samples off"
    assert aligned_correlation(sent, out.audio, lag) > 0.95

    worst = min(
        psnr(luma, make_picture(i, width, height)[:height])
        for i, luma in zip(out.frame_indices, out.lumas, strict=True)
    )
    assert worst > 30.0


async def test_copy_taken_while_recording_plays_its_completed_seconds(tmp_path: Path) -> None:
    width, height = 320, 240
    audio = make_audio(5 * FPS * SPF)
    path = tmp_path / "live.mp4"
    sink = RecorderSink(path, width=width, height=height, fps=FPS)
    await sink.start()
    for i in range(3 * FPS):
        sink.write(make_chunk(i, width, height, audio))
    await wait_encoded(sink, 3 * FPS)

    # The completed fragments are on disk and synced, and the stats say how much (read
    # by the worker as it syncs: stats() itself never touches the disk).
    synced = sink.stats().json()["bytes"]
    assert 0 < synced <= path.stat().st_size

    snapshot = tmp_path / "snapshot.mp4"
    shutil.copyfile(path, snapshot)  # as if the process had died right here
    partial = decode(snapshot)
    assert len(partial.frame_indices) >= 2 * FPS
    assert partial.frame_indices == list(range(len(partial.frame_indices)))
    assert partial.video_seconds >= 2.0
    assert partial.audio_seconds >= 2.0 - 1024 / AUDIO_RATE

    for i in range(3 * FPS, 5 * FPS):
        sink.write(make_chunk(i, width, height, audio))
    await sink.aclose()
    full = decode(path)
    assert full.frame_indices == list(range(5 * FPS))


async def test_full_queue_drops_whole_chunks_without_blocking_and_keeps_sync(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    width, height = 320, 240
    bursts = [range(0, 40), range(40, 80)]
    audio = make_audio(80 * SPF)
    path = tmp_path / "slow.mp4"
    sink = RecorderSink(path, width=width, height=height, fps=FPS, max_queue=2)
    await sink.start()

    accepted: list[int] = []
    with caplog.at_level(logging.WARNING, logger="rapido.pipeline.sinks.recorder"):
        for burst in bursts:
            # No await inside a burst: the worker cannot have encoded 40 frames by the
            # time write() returns, so every drop is a write that refused to wait.
            for i in burst:
                before = sink.dropped_frames
                sink.write(make_chunk(i, width, height, audio))
                if sink.dropped_frames == before:
                    accepted.append(i)
            await wait_encoded(sink, len(accepted))
        await sink.aclose()

    stats = sink.stats().json()
    assert stats["dropped_frames"] > 0
    assert stats["dropped_frames"] + stats["frames_written"] == 80
    assert stats["frames_written"] == len(accepted)
    assert stats["error"] is None
    drop_warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(drop_warnings) <= 2 < stats["dropped_frames"]  # rate-limited

    out = decode(path)
    # Pictures: exactly the accepted ones, each at its own index.
    assert out.frame_indices == accepted
    # Audio: the accepted chunks' audio at their index, silence in the gaps, so the
    # audio track lasts as long as the video and stays in step with it.
    expected = np.zeros((accepted[-1] + 1) * SPF, dtype=np.float32)
    for i in accepted:
        expected[i * SPF : (i + 1) * SPF] = audio[i * SPF : (i + 1) * SPF] / 32768
    assert stats["audio_samples_written"] == len(expected)
    assert abs(len(out.audio) - len(expected)) <= 1024
    assert abs(out.video_seconds - out.audio_seconds) <= 1 / FPS
    lag = best_lag(expected, out.audio)
    assert abs(lag) <= 48
    assert aligned_correlation(expected, out.audio, lag) > 0.95


@pytest.mark.parametrize("where", ["under_a_file", "is_a_directory"])
async def test_unwritable_path_fails_start_with_the_path(tmp_path: Path, where: str) -> None:
    if where == "under_a_file":
        blocker = tmp_path / "plain-file"
        blocker.write_bytes(b"not a directory")
        path = blocker / "sub" / "x.mp4"
    else:
        path = tmp_path / "a-directory"
        path.mkdir()
    sink = RecorderSink(path, width=320, height=240, fps=FPS)
    with pytest.raises(SinkError) as info:
        await sink.start()
    assert str(path) in str(info.value)

    audio = make_audio(SPF)
    sink.write(make_chunk(0, 320, 240, audio))  # ignored, never raises into the stream
    assert sink.stats().json()["discarded_frames"] == 1
    await sink.aclose()
    await sink.aclose()


async def test_close_without_frames_leaves_a_valid_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    sink = RecorderSink(path, width=320, height=240, fps=FPS)
    await sink.start()
    await asyncio.gather(sink.aclose(), sink.aclose())  # concurrent closes share one
    await sink.aclose()
    assert path.exists()
    out = decode(path)
    assert out.frame_indices == []
    assert len(out.audio) == 0
    with pytest.raises(SinkError):
        await sink.start()


async def test_close_without_start_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "never.mp4"
    sink = RecorderSink(path, width=320, height=240, fps=FPS)
    await sink.aclose()
    await sink.aclose()
    assert not path.exists()
    assert sink.stats().json()["bytes"] == 0


async def test_worker_failure_is_logged_and_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    width, height = 320, 240
    audio = make_audio(20 * SPF)
    path = tmp_path / "broken.mp4"
    sink = RecorderSink(path, width=width, height=height, fps=FPS)
    await sink.start()
    with caplog.at_level(logging.ERROR, logger="rapido.pipeline.sinks.recorder"):
        for i in range(10):
            sink.write(make_chunk(i, width, height, audio))
        # A picture that is not I420-shaped makes PyAV raise inside the worker.
        bad = np.zeros((11, 10), dtype=np.uint8)
        sink.write(MediaChunk(10, VideoFrame(bad, 10, 7), audio[:SPF], speaking=False))
        for i in range(11, 20):
            sink.write(make_chunk(i, width, height, audio))
        await sink.aclose()  # does not raise

    stats = sink.stats().json()
    assert stats["error"] is not None and "ValueError" in stats["error"]
    assert stats["frames_written"] == 10
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    # What was encoded before the failure is still a playable file.
    assert decode(path).frame_indices == list(range(10))


async def test_resizes_mismatched_pictures_and_skips_repeated_indices(tmp_path: Path) -> None:
    audio = make_audio(10 * SPF)
    path = tmp_path / "odd.mp4"
    sink = RecorderSink(path, width=320, height=240, fps=FPS)
    await sink.start()
    for i in [0, 1, 1, 2, 3]:
        sink.write(make_chunk(i, 160, 120, audio))
    await sink.aclose()
    stats = sink.stats().json()
    assert stats["frames_written"] == 4
    assert stats["out_of_order_frames"] == 1
    with av.open(str(path)) as container:
        sizes = {(f.width, f.height) for f in container.decode(video=0)}
    assert sizes == {(320, 240)}


async def test_recording_starts_at_zero_when_joining_a_running_stream(tmp_path: Path) -> None:
    audio = make_audio(60 * SPF)
    path = tmp_path / "late.mp4"
    sink = RecorderSink(path, width=320, height=240, fps=FPS)
    await sink.start()
    for i in range(50, 60):
        sink.write(make_chunk(i, 320, 240, audio))
    await sink.aclose()
    out = decode(path)
    assert out.frame_indices == list(range(10))
    assert abs(out.video_seconds - out.audio_seconds) <= 1 / FPS


def test_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RecorderSink(tmp_path / "a.mp4", width=321, height=240, fps=FPS)
    with pytest.raises(ValueError):
        RecorderSink(tmp_path / "a.mp4", width=320, height=240, fps=7)  # 48000 % 7 != 0
    with pytest.raises(ValueError):
        RecorderSink(tmp_path / "a.mp4", width=320, height=240, fps=FPS, max_queue=0)
