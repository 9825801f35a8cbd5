"""Wav2Lip mel features: the reference math, the 48 -> 16 kHz decimator, and the
incremental, batched MelStream against the whole-utterance reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapido.pipeline import features
from rapido.pipeline.features import (
    MelSpec,
    MelStream,
    compute_pending,
    downsample_16k,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    melspectrogram,
)

SPEC = MelSpec()
FIXTURE = Path(__file__).parent / "data" / "wav2lip_mel_librosa.npz"


def speech48(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like int16 at 48 kHz: gliding harmonics, syllable-rate envelope with
    silent gaps, a little broadband noise (so the decimator's stopband matters)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 48_000)) / 48_000
    f0 = 110 + 30 * np.sin(2 * np.pi * 0.9 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / 48_000
    voice = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    x = (0.25 * voice + rng.normal(0, 0.03, t.size)) * envelope
    return (np.clip(x, -1, 1) * 20_000).astype(np.int16)


def wav2lip_chunks(mel: np.ndarray, fps: int = 25) -> list[np.ndarray]:
    """Wav2Lip inference.py's mel chunking, verbatim in behaviour."""
    chunks = []
    mel_idx_multiplier = 80.0 / fps
    i = 0
    while True:
        start_idx = int(i * mel_idx_multiplier)
        if start_idx + 16 > len(mel[0]):
            chunks.append(mel[:, len(mel[0]) - 16 :])
            break
        chunks.append(mel[:, start_idx : start_idx + 16])
        i += 1
    return chunks


def reference_windows(audio48: np.ndarray) -> list[np.ndarray]:
    return wav2lip_chunks(melspectrogram(downsample_16k(audio48)))


def expected_window(chunks: list[np.ndarray], n: int) -> np.ndarray:
    # Video frames past Wav2Lip's last chunk get the last 16 frames too; an utterance
    # under 16 frames (where Wav2Lip would fail) is right-padded with the floor.
    w = chunks[min(n, len(chunks) - 1)]
    return np.pad(w, ((0, 0), (0, 16 - w.shape[1])), constant_values=-4.0)


def window(stream: MelStream, n: int) -> np.ndarray:
    w = stream.window(n)
    assert w is not None, f"window {n} not ready"
    return w


def feed_in_chunks(stream: MelStream, audio: np.ndarray, sizes: Iterator[int]) -> None:
    at = 0
    while at < audio.size:
        k = next(sizes)
        stream.feed48(audio[at : at + k])
        at += k


AUDIO = speech48(1.37, seed=1)  # 1.37 s: the last video frame is partial
REF = reference_windows(AUDIO)


# --- MelSpec ---------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [20, 24, 25, 30, 50, 60])
def test_mel_start_is_wav2lip_float_index_for_a_million_frames(fps: int) -> None:
    n = np.arange(10**6, dtype=np.int64)
    # numpy float64 multiply is the same IEEE operation as Python's float *.
    wav2lip = np.floor((80.0 / fps) * n.astype(np.float64)).astype(np.int64)
    assert np.array_equal(wav2lip, n * 80 // fps)
    spec = MelSpec(fps=fps)
    for k in [0, 1, 2, 3, 4, 5, 6, 7, 999_999, 123_457, 10**9 + 7]:
        assert spec.mel_start(k) == int(80.0 / fps * k)


def test_lookahead_is_worst_case_over_frames() -> None:
    worst = max(SPEC.samples48_needed(n) - (n + 1) * 1920 for n in range(200))
    assert SPEC.lookahead_samples48 == worst == 8429  # 175.6 ms, 151 of them the low-pass
    assert SPEC.fir_half == 151


@pytest.mark.parametrize("n", [0, 1, 4, 5, 23])
def test_window_appears_exactly_when_its_audio_has_arrived(n: int) -> None:
    audio = speech48(1.5, seed=2)
    need = SPEC.samples48_needed(n)
    stream = MelStream()
    stream.feed48(audio[: need - 1])
    assert stream.window(n) is None
    stream.feed48(audio[need - 1 : need])
    w = stream.window(n)
    assert w is not None
    np.testing.assert_allclose(w, reference_windows(audio)[n], atol=1e-5)


TRAINED = MelSpec(offset_frames=-1)  # Wav2Lip's training window


def test_offset_window_starts_one_frame_early_as_wav2lip_trained() -> None:
    # get_segmented_mels: 0-based frame f takes the window of crop_audio_window(spec,
    # f - 1), which starts at int(80 * (f - 1) / fps).
    for f in range(1, 2000):
        assert TRAINED.mel_start(f) == int(80.0 * (f - 1) / 25)
    assert TRAINED.mel_start(0) == -4  # floor, like every later frame: before the audio
    assert TRAINED.lookahead_samples48 == 6509  # 135.6 ms: 40 ms less than at 0
    assert TRAINED.lookahead_samples48 == max(
        TRAINED.samples48_needed(n) - (n + 1) * 1920 for n in range(200))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 23])
def test_offset_windows_are_the_reference_shifted_with_silence_before(n: int) -> None:
    audio = speech48(1.5, seed=2)
    mel = melspectrogram(downsample_16k(audio))
    need = TRAINED.samples48_needed(n)
    stream = MelStream(TRAINED)
    stream.feed48(audio[: need - 1])
    assert stream.window(n) is None
    stream.feed48(audio[need - 1 :])
    w = window(stream, n)
    start = TRAINED.mel_start(n)
    lead = max(0, -start)
    assert (w[:, :lead] == -4.0).all()  # the silence before the utterance
    np.testing.assert_allclose(w[:, lead:], mel[:, start + lead : start + 16], atol=1e-5)


def test_offset_partial_window_at_utterance_start() -> None:
    audio = speech48(1.0, seed=6)
    stream = MelStream(TRAINED)
    stream.feed48(audio[:4800])  # 100 ms, less than frame 0 needs
    assert stream.window(0) is None
    part = stream.window(0, partial=True)
    assert part is not None
    have = stream.available_frames
    assert (part[:, :4] == -4.0).all()
    assert np.array_equal(part[:, 4 + have :],
                          np.repeat(part[:, 3 + have : 4 + have], 12 - have, axis=1))
    stream.finish()
    full = window(stream, 0)
    np.testing.assert_allclose(full[:, : 4 + have], part[:, : 4 + have], atol=1e-6)


def test_offset_short_utterance_keeps_its_place() -> None:
    """Shorter than a window: silence before it (the offset), its frames, silence after."""
    audio = speech48(0.1, seed=4)
    audio[:] = np.where(audio == 0, 1000, audio)
    mel = melspectrogram(downsample_16k(audio))
    stream = MelStream(TRAINED)
    stream.feed48(audio)
    stream.finish()
    w = window(stream, 0)
    t = mel.shape[1]
    assert (w[:, :4] == -4.0).all() and (w[:, 4 + t :] == -4.0).all()
    np.testing.assert_allclose(w[:, 4 : 4 + t], mel, atol=1e-5)


def test_bad_spec_is_rejected() -> None:
    with pytest.raises(ValueError):
        MelSpec(sample_rate=24_000)  # decimation 2: even
    with pytest.raises(ValueError):
        MelSpec(hop=300)
    with pytest.raises(ValueError):
        MelSpec(fmax=9000.0)
    with pytest.raises(ValueError):
        MelSpec(fps=7)
    with pytest.raises(ValueError):
        MelSpec(offset_frames=9)


# --- filterbank and reference mel ------------------------------------------------------


def test_mel_scale_round_trips() -> None:
    f = np.array([0.0, 55.0, 500.0, 999.0, 1000.0, 1001.0, 4000.0, 7600.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(f)), f, rtol=1e-12, atol=1e-9)
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)


def test_mel_filterbank_shape_and_properties() -> None:
    fb = mel_filterbank(SPEC)
    assert fb.shape == (80, 401)
    assert (fb >= 0).all()
    assert (fb.sum(axis=1) > 0).all()
    peaks = fb.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > peaks[0]
    freqs = np.linspace(0, 8000, 401)
    assert not fb[:, freqs < 55].any()
    assert not fb[:, freqs > 7600].any()


# From librosa 0.11.0 in a throwaway venv (not a project dependency):
#   librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)  (float32)
LIBROSA_MEL_VALUES = {
    (0, 4): 0.019347960129380226,
    (0, 5): 0.020812449976801872,
    (1, 6): 0.02248530648648739,
    (10, 22): 0.019764693453907967,
    (40, 86): 0.014343159273266792,
    (40, 88): 0.0072780512273311615,
    (79, 366): 0.00363533990457654,
    (79, 379): 0.00026630080537870526,
}
# (row, first non-zero bin, last non-zero bin, peak bin, row sum), same source.
LIBROSA_MEL_ROWS = [
    (0, 3, 6, 5, 0.049364086240530014),
    (10, 21, 24, 23, 0.049364082515239716),
    (40, 84, 89, 86, 0.04992355406284332),
    (79, 353, 379, 366, 0.0499795563519001),
]


def test_mel_filterbank_matches_librosa_values() -> None:
    fb = mel_filterbank(SPEC)
    for (r, c), v in LIBROSA_MEL_VALUES.items():
        assert fb[r, c] == pytest.approx(v, rel=1e-6)
    for r, first, last, peak, total in LIBROSA_MEL_ROWS:
        nz = np.flatnonzero(fb[r])
        assert (nz[0], nz[-1], int(fb[r].argmax())) == (first, last, peak)
        assert fb[r].sum() == pytest.approx(total, rel=1e-6)
    # The whole matrix, saved by tests/data's generator (see the module docstring there).
    np.testing.assert_allclose(fb, np.load(FIXTURE)["mel_basis"], rtol=1e-6, atol=1e-9)


def _fixture_signal() -> np.ndarray:
    # Must match the generator that wrote tests/data/wav2lip_mel_librosa.npz.
    t = np.arange(9_601) / 16_000.0
    f = 150.0 + 900.0 * t
    ph = 2 * np.pi * np.cumsum(f) / 16_000.0
    x: Any = sum(np.sin(k * ph) / k for k in range(1, 12))
    x = x * (0.2 + 0.15 * np.sin(2 * np.pi * 3.0 * t))
    x = x + 0.05 * np.sin(2 * np.pi * 6_100.0 * t) + 0.02 * np.sin(2 * np.pi * 7_300.0 * t + 1.0)
    x[4000:4800] = 0.0
    return np.asarray(x, dtype=np.float32)


def test_melspectrogram_matches_wav2lip_on_librosa() -> None:
    """tests/data/wav2lip_mel_librosa.npz holds Wav2Lip's audio.melspectrogram (its code,
    with scipy.signal.lfilter and librosa 0.11's stft pinned to pad_mode='reflect', as
    librosa 0.7 defaulted) of _fixture_signal() as float32, computed once in a throwaway
    venv. librosa runs in float32, we in float64: they agree to float32 rounding."""
    want = np.load(FIXTURE)["mel"]
    got = melspectrogram(_fixture_signal())
    assert got.shape == want.shape == (80, 1 + 9_601 // 200)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got[:, 22:23] == -4).all()  # frames inside the gap are the floor


@pytest.mark.parametrize("freq", [300.0, 1000.0, 2500.0, 6000.0])
def test_pure_tone_peaks_at_its_mel_band(freq: float) -> None:
    t = np.arange(16_000) / 16_000
    mel = melspectrogram(0.5 * np.sin(2 * np.pi * freq * t))
    centres = mel_to_hz(np.linspace(hz_to_mel(55.0), hz_to_mel(7600.0), 82))[1:-1]
    want = int(np.argmin(np.abs(centres - freq)))
    assert (mel[:, 5:-5].argmax(axis=0) == want).all()


def test_silence_is_the_floor() -> None:
    mel = melspectrogram(np.zeros(8_000))
    assert mel.shape == (80, 41)
    assert (mel == -4.0).all()
    assert melspectrogram(np.zeros(0)).shape == (80, 0)


# --- decimator ---------------------------------------------------------------------------


def test_downsample_is_a_faithful_lowpass() -> None:
    n = 48_000
    t = np.arange(n) / 48_000
    t16 = np.arange(n // 3) / 16_000
    inner = slice(200, -200)  # away from the utterance edges, where silence is filtered in
    for f in (100.0, 1000.0, 4000.0, 7000.0, 7600.0):
        y = downsample_16k(0.5 * np.sin(2 * np.pi * f * t))
        assert y.size == n // 3
        np.testing.assert_allclose(y[inner], 0.5 * np.sin(2 * np.pi * f * t16)[inner], atol=1e-4)
    for f in (8400.0, 9000.0, 12_000.0, 20_000.0):
        y = downsample_16k(0.5 * np.sin(2 * np.pi * f * t))
        assert np.abs(y[inner]).max() < 0.5 * 10 ** (-70 / 20), f
    assert downsample_16k(np.full(3000, 0.25))[100:-100] == pytest.approx(0.25, abs=1e-9)
    assert downsample_16k(np.zeros(7, np.int16)).size == 3  # ceil(7 / 3), as librosa


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 7_000), min_size=1, max_size=30), seed=st.integers(0, 9))
def test_streamed_16k_signal_equals_one_shot(sizes: list[int], seed: int) -> None:
    audio = speech48(0.4, seed=seed)
    got: list[np.ndarray] = []
    push = MelStream._push16

    def spy(self: MelStream, x16: np.ndarray, pre: np.ndarray) -> None:
        got.append(x16.copy())
        push(self, x16, pre)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(MelStream, "_push16", spy)
        stream = MelStream()
        cycle = iter(sizes * (audio.size // min(sizes) + 1))
        feed_in_chunks(stream, audio, cycle)
        compute_pending([stream])
        stream.finish()
        compute_pending([stream])
    np.testing.assert_allclose(np.concatenate(got), downsample_16k(audio), rtol=0, atol=1e-12)


# --- MelStream against the reference ----------------------------------------------------


def _all_windows(stream: MelStream) -> list[np.ndarray]:
    out = []
    for n in range(stream.video_frames):
        w = stream.window(n)
        assert w is not None and w.shape == (80, 16) and w.dtype == np.float32
        out.append(w)
    return out


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 6_000), min_size=1, max_size=40),
    compute_every=st.integers(1, 4),
)
def test_incremental_equals_reference(sizes: list[int], compute_every: int) -> None:
    """Any chunking gives the reference windows, first and last frames included: both
    sides pad the STFT with the same reflection. Each STFT frame is computed once. The
    drawn chunk sizes come first, then 40 ms ticks (bounding the test's run time)."""
    rows_computed = 0
    mel_rows = features._mel_rows

    def counting(frames: np.ndarray, spec: MelSpec) -> np.ndarray:
        nonlocal rows_computed
        rows_computed += frames.shape[0]
        return mel_rows(frames, spec)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(features, "_mel_rows", counting)
        stream = MelStream()
        chunks = iter([*sizes, *[1920] * (AUDIO.size // 1920 + 1)])
        at, i, checked = 0, 0, 0
        while at < AUDIO.size:
            k = next(chunks)
            stream.feed48(AUDIO[at : at + k])
            at, i = min(at + k, AUDIO.size), i + 1
            if i % compute_every == 0:
                compute_pending([stream])
                # Every window whose audio is in must be out already, and right.
                while SPEC.samples48_needed(checked) <= at:
                    np.testing.assert_allclose(window(stream, checked), REF[checked], atol=1e-5)
                    checked += 1
                assert stream.window(checked) is None
        stream.finish()
        windows = _all_windows(stream)
    total = SPEC.n_frames(SPEC.n16(AUDIO.size))
    assert stream.total_frames == stream.available_frames == stream.stft_frames == total
    assert rows_computed == total  # never recomputed
    assert stream.samples16 == SPEC.n16(AUDIO.size)
    assert len(windows) == 35  # 1.37 s at 25 fps, the partial last frame included
    for n, w in enumerate(windows):
        np.testing.assert_allclose(w, expected_window(REF, n), atol=1e-5)


def test_whole_utterance_in_one_feed() -> None:
    # One 2.5 s chunk: many filter rows and several bounded rounds in one compute_pending.
    audio = speech48(2.5, seed=3)
    stream = MelStream()
    stream.feed48(audio)
    stream.finish()
    ref = reference_windows(audio)
    windows = _all_windows(stream)
    assert len(windows) == 63 and len(ref) == 60  # Wav2Lip stops at its first padded chunk
    for n, w in enumerate(windows):
        np.testing.assert_allclose(w, expected_window(ref, n), atol=1e-5)


def test_window_waits_then_every_frame_gets_one_after_finish() -> None:
    stream = MelStream()
    stream.feed48(AUDIO[:9_000])
    assert stream.window(0) is None  # 9000 < samples48_needed(0) == 10_349
    stream.feed48(AUDIO[9_000:])
    assert stream.window(0) is not None
    last = stream.video_frames - 1
    assert stream.window(last) is None  # its window runs past the audio so far
    stream.finish()
    w = stream.window(last)
    assert w is not None
    np.testing.assert_allclose(w, REF[-1], atol=1e-5)
    mel = melspectrogram(downsample_16k(AUDIO))
    np.testing.assert_allclose(w, mel[:, -16:], atol=1e-5)


@pytest.mark.parametrize("n48", [1, 2, 600, 1_205, 1_920, 9_000])
def test_short_utterance_is_padded_to_a_full_window(n48: int) -> None:
    """Shorter than 16 mel frames (Wav2Lip would fail): the frames there are, then the
    silence floor. Under 401 samples at 16 kHz the STFT's reflection wraps (np.pad)."""
    audio = speech48(0.2, seed=4)[:n48]
    audio[:] = np.where(audio == 0, 1000, audio)  # no accidental silence
    mel = melspectrogram(downsample_16k(audio))
    stream = MelStream()
    stream.feed48(audio)
    assert stream.window(0) is None
    stream.finish()
    w = stream.window(0)
    assert w is not None and w.shape == (80, 16)
    t = mel.shape[1]
    np.testing.assert_allclose(w[:, :t], mel, atol=1e-5)
    assert (w[:, t:] == -4.0).all()
    assert stream.video_frames == -(-n48 // 1920)


def test_compute_pending_across_streams_equals_one_at_a_time() -> None:
    audios = [speech48(s, seed=i) for i, s in enumerate([1.0, 0.6, 1.3, 0.05, 0.9])]
    rng = np.random.default_rng(7)
    plans = [[int(k) for k in rng.integers(200, 4_000, 200)] for _ in audios]
    batched = [MelStream() for _ in audios]
    alone = [MelStream() for _ in audios]
    pos = [0] * len(audios)
    for tick in range(200):
        for j, audio in enumerate(audios):
            if pos[j] >= audio.size:
                continue
            k = plans[j][tick]
            for s in (batched[j], alone[j]):
                s.feed48(audio[pos[j] : pos[j] + k])
            pos[j] += k
            if pos[j] >= audio.size:
                batched[j].finish()
                alone[j].finish()
        compute_pending(batched)
        for s in alone:
            compute_pending([s])
        for b, a in zip(batched, alone, strict=True):
            assert b.available_frames == a.available_frames
    for j, audio in enumerate(audios):
        ref = reference_windows(audio)
        for n in range(batched[j].video_frames):
            wb, wa = batched[j].window(n), alone[j].window(n)
            assert wb is not None and wa is not None
            np.testing.assert_allclose(wb, wa, atol=1e-5)
            np.testing.assert_allclose(wb, expected_window(ref, n), atol=1e-5)


def test_reset_starts_a_clean_utterance() -> None:
    stream = MelStream()
    stream.feed48(speech48(0.7, seed=5))
    assert stream.window(3) is not None
    stream.reset()
    assert stream.available_frames == stream.stft_frames == stream.samples16 == 0
    assert stream.samples48 == 0 and not stream.finished and stream.total_frames is None
    assert stream.window(0) is None
    stream.feed48(AUDIO)
    stream.finish()
    for n, w in enumerate(_all_windows(stream)):
        np.testing.assert_allclose(w, expected_window(REF, n), atol=1e-5)
    stream.reset()
    stream.feed48(AUDIO[:5_000])  # a finished stream takes audio again after reset
    assert stream.samples48 == 5_000


def test_release_frees_old_frames_but_keeps_the_tail() -> None:
    stream = MelStream()
    stream.feed48(AUDIO)
    stream.finish()
    compute_pending([stream])
    stream.release(20)
    with pytest.raises(ValueError):
        stream.window(19)
    for n in range(20, stream.video_frames):
        np.testing.assert_allclose(window(stream, n), expected_window(REF, n), atol=1e-5)
    stream.release(10_000)  # past the end: the last 16 frames stay
    np.testing.assert_allclose(window(stream, 10_000), REF[-1], atol=1e-5)


def test_bad_input_is_rejected() -> None:
    stream = MelStream()
    for bad in (
        np.zeros(10, np.float32),
        np.zeros(10, np.int32),
        np.zeros((10, 2), np.int16),
        np.zeros((), np.int16),
    ):
        with pytest.raises(ValueError):
            stream.feed48(bad)
    with pytest.raises(ValueError):
        stream.feed48([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        stream.window(-1)
    with pytest.raises(ValueError):
        melspectrogram(np.zeros((2, 100)))
    with pytest.raises(ValueError):
        downsample_16k(np.zeros(10, np.int32))
    assert stream.samples48 == 0


def test_mixed_specs_cannot_share_a_batch() -> None:
    a, b = MelStream(), MelStream(MelSpec(fps=50))
    a.feed48(AUDIO[:5_000])
    b.feed48(AUDIO[:5_000])
    with pytest.raises(ValueError):
        compute_pending([a, b])


def test_feeding_after_finish_needs_reset() -> None:
    stream = MelStream()
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed48(np.zeros(10, np.int16))


def test_partial_window_repeats_the_last_computed_frame() -> None:
    from rapido.pipeline.features import MelStream

    rng = np.random.default_rng(3)
    audio = (rng.normal(0, 3000, 48_000)).astype(np.int16)
    s = MelStream()
    s.feed48(audio[:4800])  # 100 ms: frame 0's window (200 ms) is not complete
    assert s.window(0) is None
    part = s.window(0, partial=True)
    assert part is not None and part.shape == (80, 16)
    have = s.available_frames
    assert 0 < have < 16
    assert np.array_equal(part[:, have:], np.repeat(part[:, have - 1 : have], 16 - have, axis=1))
    assert s.window(50, partial=True) is None  # nothing of that window exists yet
    s.feed48(audio[4800:])
    full = s.window(0)
    assert full is not None
    assert np.allclose(full[:, :have], part[:, :have], atol=1e-6)  # computed frames agree
