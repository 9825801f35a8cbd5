"""Writes wav2lip_mel_librosa.npz, the reference numbers for tests/test_features.py.

Not part of the test run and not a project dependency: run it once in a throwaway venv
(``python -m venv /tmp/rosa && /tmp/rosa/bin/pip install librosa scipy``, librosa 0.11.0 /
scipy 1.17.1 made the committed file) from the repository root:

    /tmp/rosa/bin/python tests/data/make_wav2lip_mel_librosa.py

``mel_basis`` is ``librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55,
fmax=7600)``; ``mel`` is Wav2Lip's ``audio.melspectrogram`` of ``signal16k()`` (float32, as
``librosa.load`` returns), with ``pad_mode='reflect'`` pinned because Wav2Lip's librosa
0.7 defaulted to it and librosa >= 0.10 does not.
"""

from __future__ import annotations

from pathlib import Path

import librosa  # type: ignore[import-not-found, unused-ignore]
import numpy as np
import scipy.signal  # type: ignore[import-not-found, unused-ignore]

MEL_BASIS = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)


def melspectrogram(wav: np.ndarray) -> np.ndarray:
    """Wav2Lip audio.py with hparams.py's values inlined."""
    y = scipy.signal.lfilter([1, -0.97], [1], wav)
    d = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, pad_mode="reflect")
    s = 20 * np.log10(np.maximum(np.exp(-100 / 20 * np.log(10)), MEL_BASIS @ np.abs(d))) - 20
    return np.clip((2 * 4) * ((s - -100) / 100) - 4, -4, 4)


def signal16k() -> np.ndarray:
    """Keep in sync with tests/test_features.py::_fixture_signal."""
    t = np.arange(9_601) / 16_000.0
    f = 150.0 + 900.0 * t
    ph = 2 * np.pi * np.cumsum(f) / 16_000.0
    x = sum(np.sin(k * ph) / k for k in range(1, 12))
    x = x * (0.2 + 0.15 * np.sin(2 * np.pi * 3.0 * t))
    x = x + 0.05 * np.sin(2 * np.pi * 6_100.0 * t) + 0.02 * np.sin(2 * np.pi * 7_300.0 * t + 1.0)
    x[4000:4800] = 0.0  # a gap: frames at the -4 floor
    return np.asarray(x, dtype=np.float32)


if __name__ == "__main__":
    np.savez_compressed(
        Path(__file__).with_name("wav2lip_mel_librosa.npz"),
        mel_basis=MEL_BASIS.astype(np.float32),
        mel=melspectrogram(signal16k()).astype(np.float32),
    )
